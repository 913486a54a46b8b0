"""The training loop shared by train_unet.py and train_segnet.py.

    train(config) -> summary dict              what tests call; main(model, argv) -> exit code

The pieces live by concern: flags and TrainConfig in train_config.py, losses and the per-replica
steps in steps.py, checkpoints in checkpoints.py, CSVs/TensorBoard/plots in outputs.py and plots.py,
devices, strategy and every tf.distribute call in distribute.py, metrics in metrics.py. ``train``
sets a run up; ``Run`` holds its pieces, and ``Run.loop`` reads top to bottom: train up to the end
of the epoch (``test_every_n_steps`` steps), run a full test pass, log, checkpoint (latest, and
best by test loss), decide on early stopping. The test pass (evaluation.py) predicts the whole test
images exactly as inference.py does, so its metrics are those of the masks inference.py writes.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

import augment
import checkpoints
import distribute
import evaluation
import optim
import outputs
import records
import steps
from checkpoints import CHECKPOINT_FILES, TrainState  # noqa: F401  (re-exported for callers)
from train_config import (EXIT_BAD_FLAGS, EXIT_ERROR, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM,  # noqa: F401
                          ConfigError, TrainConfig, TrainingError, build_parser, config_from_args,
                          model_options, optimizer_settings, read_database_metadata,
                          validate_config)


def main(model_name, argv=None):
    """Entry point of train_<model>.py. Returns the process exit code."""
    parser = build_parser(model_name)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(model_name, args)
        summary = train(config)
    except (ConfigError, distribute.DistributionError) as error:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_FLAGS
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except _reader_error_types() as error:
        print(f"error: an image reader failed: {error}", file=sys.stderr)
        details = getattr(error, "worker_traceback", None)
        if details:
            print(details, file=sys.stderr)
        return EXIT_ERROR
    return summary["exit_code"]


def _reader_error_types():
    import imagereader
    return (imagereader.ImageReaderError,)


def build_model(config, input_channels):
    """The network described by ``config`` (any input H, W divisible by the model's divisor)."""
    import models

    return models.build_model(config.model, config.number_classes, input_channels=input_channels,
                              base_filters=config.base_filters, batch_norm=config.batch_norm,
                              **model_options(config))


# ----------------------------------------------------------------------------------------------
# Setting a run up
# ----------------------------------------------------------------------------------------------

def train(config):
    """Train one model as described by ``config``.

    Returns:
      Summary dict: exit_code (0 finished, 130/143 stopped by a signal), stop_reason, step, epoch,
      best_loss, best_epoch, history (test loss per epoch), effective_batch, output_dir,
      model_path (None unless exported), is_chief, num_workers, towers.
    Raises:
      ConfigError / distribute.DistributionError for unusable settings, TrainingError on a
      non-finite loss, imagereader.ImageReaderError when a reader fails.
    """
    # Everything that can refuse the run comes before anything is written: a refused run
    # creates nothing.
    train_metadata = read_database_metadata(config.train_database, "train")
    test_metadata = read_database_metadata(config.test_database, "test")
    validate_config(config, train_metadata, test_metadata)
    input_channels = train_metadata["channels"]
    checkpoint_dir = find_restore_checkpoint(config.restore_checkpoint_filepath)
    fingerprints = {"train": checkpoints.database_fingerprint(train_metadata),
                    "test": checkpoints.database_fingerprint(test_metadata)}
    database_warnings = []
    if checkpoint_dir:
        saved = checkpoints.read_config(checkpoint_dir)
        checkpoints.check_compatible(checkpoint_dir, saved, config, input_channels)
        database_warnings = checkpoints.database_differences(checkpoint_dir, saved, config, fingerprints)

    # Devices and strategy come before any other TensorFlow work (see distribute.py).
    cluster = distribute.detect_cluster(os.environ)
    towers = distribute.configure_devices(config.cpu_towers, config.gpus)
    reduce_to = distribute.parse_reduction_location(
        config.gradient_update_location, len(towers) if towers[0].startswith("/gpu") else 0)
    distribute.check_xla(config.xla, config.model)
    strategy = distribute.build_strategy(towers, reduce_to, cluster)
    info = distribute.cluster_info(strategy)

    import keras
    keras.mixed_precision.set_global_policy(steps.precision_policy(config.mixed_precision))
    keras.utils.set_random_seed(config.seed)
    global_batch = config.batch_size * len(towers) * info.num_workers
    steps_per_epoch = config.test_every_n_steps or max(1, math.ceil(train_metadata["num_records"] / global_batch))
    # ConfigError (nothing written yet) for a warm-up past the end; config.json records what is used.
    settings = optimizer_settings(config, steps_per_epoch)
    config_dict = dict(dataclasses.asdict(config), input_channels=input_channels, effective_batch=global_batch,
                       towers=towers, num_workers=info.num_workers,
                       reduction=distribute.reduction_in_use(towers, reduce_to, info.num_workers),
                       steps_per_epoch=steps_per_epoch, run_length=settings.total_steps,
                       warmup_steps=settings.warmup_steps,
                       tool_version=records.TOOL_VERSION,
                       train_database_fingerprint=fingerprints["train"],
                       test_database_fingerprint=fingerprints["test"])
    with strategy.scope():
        model = build_model(config, input_channels)
        optimizer = steps.make_optimizer(config, steps_per_epoch)
        optimizer.build(model.trainable_variables)
    state, resumed = TrainState(), False
    if checkpoint_dir:
        state, resumed = checkpoints.restore_checkpoint(checkpoint_dir, model, optimizer, config, input_channels,
                                                        fine_tune=bool(database_warnings))
    train_reader = make_train_reader(config, len(towers), info, state.step)

    if info.is_chief:
        _create_output_dir(config.output_dir, config_dict)
        print("configuration:\n" + json.dumps(config_dict, indent=2, sort_keys=True, default=str), flush=True)
        print(distribute.describe(strategy, towers, reduce_to, info), flush=True)
        if info.num_workers > 1 and config.gradient_update_location is not None:
            print(f"warning: --gradient_update_location {config.gradient_update_location} is not used with "
                  f"{info.num_workers} workers: the gradients of all replicas are summed by a "
                  f"{config_dict['reduction']}", file=sys.stderr, flush=True)
        if distribute.env_summary():
            print(f"environment: {distribute.env_summary()}", flush=True)
        print(f"effective batch: {config.batch_size} per tower x {len(towers)} tower(s) x "
              f"{info.num_workers} worker(s) = {global_batch}", flush=True)
        source_dir = checkpoints.output_dir_of(checkpoint_dir) if checkpoint_dir else None
        if resumed and source_dir is not None and os.path.abspath(config.output_dir) != source_dir:
            checkpoints.copy_previous_run(source_dir, config.output_dir)
        if checkpoint_dir:
            for warning in database_warnings:
                print(warning, file=sys.stderr, flush=True)
    run_outputs = outputs.Outputs(config.output_dir, config.number_classes, info.is_chief,
                                  state if resumed else None)
    run = Run(config, config_dict, strategy, info, model, optimizer, train_reader, run_outputs,
              steps_per_epoch, global_batch, last_checkpoint=state.step if resumed else None)
    try:
        with StopSignals() as stop, train_reader:
            stop_reason = run.loop(state, stop)
    finally:
        run_outputs.close()
    exit_code = {"sigterm": EXIT_SIGTERM, "sigint": EXIT_SIGINT}.get(stop_reason, EXIT_OK)
    model_path = None
    if exit_code == EXIT_OK and info.is_chief:
        model_path = checkpoints.export_model(config.output_dir, config_dict)
    if info.is_chief:
        _print_locations(config.output_dir, stop_reason, state, model_path)
    return {"exit_code": exit_code, "stop_reason": stop_reason, "step": state.step, "epoch": state.epoch,
            "best_loss": state.best_loss, "best_epoch": state.best_epoch, "history": list(state.history),
            "effective_batch": global_batch, "output_dir": config.output_dir, "model_path": model_path,
            "is_chief": info.is_chief, "num_workers": info.num_workers, "towers": towers}


def _create_output_dir(output_dir, config_dict):
    """Create --output_dir (ConfigError when impossible) and write its config.json."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot create the folder ({error.strerror})") from None
    checkpoints.write_json(os.path.join(output_dir, "config.json"), config_dict)


def find_restore_checkpoint(path):
    """The checkpoint folder --restore_checkpoint_filepath means (latest first), None when not
    given, or ConfigError."""
    if not path:
        return None
    found = checkpoints.find_checkpoint(path, prefer="latest")
    if found is None:
        raise ConfigError(
            f"--restore_checkpoint_filepath {path}: no checkpoint there; expected a folder holding "
            f"{', '.join(CHECKPOINT_FILES)} or an output folder with checkpoints/latest")
    return found


def make_train_reader(config, towers, info, start_step):
    """The training ImageReader of this worker (not started). (The test pass reads its whole test
    images itself: see evaluation.py.)"""
    import imagereader

    augmentation = augment.AugmentationConfig(**config.augmentation)
    # A resumed run draws a new sampling stream instead of replaying the batches already seen.
    seed = config.seed + 7919 * start_step
    common = dict(num_workers=config.reader_count * towers, tile_size=config.tile_size,
                  shard_index=info.worker_index, shard_count=info.num_workers)
    try:
        train_reader = imagereader.ImageReader(
            config.train_database, config.batch_size, use_augmentation=config.use_augmentation,
            balance_classes=config.balance_classes, mode="train", augmentation=augmentation, seed=seed,
            foreground_crop_fraction=config.foreground_crop_fraction, **common)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    return train_reader


# ----------------------------------------------------------------------------------------------
# The run: its pieces, the loop, and the loop's helpers
# ----------------------------------------------------------------------------------------------

class Run:
    """One training run: the model, its steps, readers and outputs, and the loop over them."""

    def __init__(self, config, config_dict, strategy, info, model, optimizer, train_reader, outputs,
                 steps_per_epoch, global_batch, last_checkpoint=None):
        self.config, self.config_dict = config, config_dict
        self.strategy, self.info = strategy, info
        self.model, self.optimizer = model, optimizer
        self.train_reader, self.outputs = train_reader, outputs
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.local_replicas = distribute.local_replica_count(strategy)
        self.train_step = steps.make_train_step(strategy, model, optimizer, config.loss, config.number_classes,
                                                global_batch, jit_compile=config.xla)
        self.evaluator = evaluation.Evaluator(model, config.model, config.test_database, config.number_classes,
                                              config.loss, shard_index=info.worker_index,
                                              shard_count=info.num_workers, options=model_options(config))
        self.sync_statistics = distribute.make_sync_statistics(strategy, model.non_trainable_variables)
        self.last_checkpoint = last_checkpoint  # step of the last checkpoint written or restored
        self.stop = None

    def loop(self, state, stop):
        """The outer loop: train an epoch, test, log, checkpoint, decide. Returns the stop reason."""
        self.stop = stop
        run_start, wall_before = time.perf_counter(), state.wall_time_s
        starvation_mark = self.train_reader.starvation_seconds
        while True:
            if self.finished(state):  # a resumed run that had already run its last test pass
                return "max_steps"
            # ---- train up to the step of the next test pass (the last one comes at --max_steps)
            epoch_end = next_test_step(state, self.steps_per_epoch)
            if self.config.max_steps:
                epoch_end = min(epoch_end, self.config.max_steps)
            while state.step < epoch_end and not self.stop_requested():
                if not self.train_one_step(state):
                    break
            state.wall_time_s = wall_before + time.perf_counter() - run_start
            if self.sync_statistics is not None:
                self.sync_statistics()
            if stop.requested:
                self.checkpoint(state, best=False)
                return stop.reason

            # ---- test pass, logging, checkpoints, early stopping
            result = self.test_pass()
            if result is None:  # stopped during the test pass: the resumed run repeats it first
                self.checkpoint(state, best=False)
                return stop.reason
            row, examples, test_seconds = result
            state.epoch += 1
            state.history.append(row["loss"])
            improved = row["loss"] < state.best_loss
            if improved:
                state.best_loss, state.best_epoch, state.epochs_without_improvement = row["loss"], state.epoch, 0
            else:
                state.epochs_without_improvement += 1
            starvation = self.train_reader.starvation_seconds
            row.update(epoch=state.epoch, step=state.step, test_seconds=test_seconds,
                       starvation_s=starvation - starvation_mark, wall_time_s=state.wall_time_s)
            starvation_mark = starvation
            self.outputs.log_test(row, examples)
            self.print_test_line(state, row, improved, test_seconds)
            self.checkpoint(state, best=improved)
            if state.epochs_without_improvement >= self.config.early_stopping:
                return "early_stopping"
            if self.config.max_epochs and state.epoch >= self.config.max_epochs:
                return "max_epochs"
            if self.finished(state):
                return "max_steps"

    def finished(self, state):
        """Whether --max_steps was reached and its test pass (the last one) done: passes come every
        steps_per_epoch steps and once more at max_steps when that is not a multiple of it."""
        last = self.config.max_steps
        if not last or state.step < last:
            return False
        return state.epoch >= last // self.steps_per_epoch + (1 if last % self.steps_per_epoch else 0)

    def test_pass(self):
        """evaluation.Evaluator's pass over the whole test images, or None when a stop signal came on
        any worker before it was complete."""
        result = self.evaluator.run(combine=lambda totals: distribute.sum_across_workers(self.strategy, totals),
                                    should_stop=lambda: self.stop.requested)
        if result is None:
            if not self.stop.requested:  # another worker was signalled
                self.stop.signal_number = signal.SIGTERM
            if self.info.is_chief:
                print("stopped during the test pass: it runs again, first thing, when the run is resumed",
                      file=sys.stderr, flush=True)
        return result

    def train_one_step(self, state):
        """Read a batch per local tower, take one optimizer step, log it. False (nothing done) when
        the readers died from the stop signal (they share the trainer's process group, so Ctrl-C
        reaches them too)."""
        step_start = time.perf_counter()
        try:
            batches = [self.train_reader.get_batch() for _ in range(self.local_replicas)]
        except _reader_error_types():
            if self.stop is not None and self.stop.requested:
                return False
            raise
        # The rate this update uses (optimizer.iterations == state.step before it), for the log.
        rate = optim.current_learning_rate(self.optimizer) if self.logs_step(state.step + 1) else None
        loss = float(self.train_step(distribute.distribute_batches(self.strategy, batches)))
        self.check_finite(loss, state.step + 1)
        state.step += 1
        self.log_step(state.step, loss, time.perf_counter() - step_start, rate)
        return True

    def check_finite(self, loss, step):
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint is {os.path.join(self.config.output_dir, 'checkpoints', 'latest')} "
                    f"(step {self.last_checkpoint})" if self.last_checkpoint is not None
                    else "no checkpoint was written yet")
            raise TrainingError(f"the training loss became {loss} at step {step}; stopping: {kept}. "
                                "Try a lower --learning_rate or another --loss")

    def logs_step(self, step):
        return step % self.config.log_every_n_steps == 0 and self.info.is_chief

    def log_step(self, step, loss, step_time, learning_rate=None):
        """train_loss.csv every step; a printed line and TensorBoard scalars (with the learning rate of
        the step) every log_every_n_steps."""
        images_per_s = self.global_batch / step_time
        self.outputs.log_step(step, loss, step_time, images_per_s)
        if self.logs_step(step):
            print(f"step {step:7d}  loss {loss:.4f}  lr {learning_rate:.6g}  step {step_time:.3f}s  "
                  f"{images_per_s:7.1f} img/s  queue {self.train_reader.get_queue_size()}", flush=True)
            self.outputs.log_scalars(step, {"train/loss": loss, "train/images_per_s": images_per_s,
                                            "train/learning_rate": learning_rate})

    def print_test_line(self, state, row, improved, seconds):
        if self.info.is_chief:
            dice = " ".join("%.3f" % row[f"dice_{k}"] for k in range(self.config.number_classes))
            verdict = "(best)" if improved else f"({state.epochs_without_improvement} without improvement)"
            print(f"epoch {state.epoch:4d}  step {state.step:7d}  test loss {row['loss']:.4f}  "
                  f"accuracy {row['pixel_accuracy']:.4f}  mean IoU {row['mean_iou']:.4f}  dice {dice}  "
                  f"{verdict}  test {seconds:.1f}s ({seconds / max(row['test_pixels'] / 1e6, 1e-9):.2f} s/MP)",
                  flush=True)

    def stop_requested(self):
        """Whether to stop now; with several workers, true as soon as any worker got a signal, so all
        of them stop at the same step instead of waiting in a collective for the missing one."""
        if self.info.num_workers == 1:
            return self.stop.requested
        votes = distribute.sum_across_workers(self.strategy, np.array([1.0 if self.stop.requested else 0.0]))
        if votes[0] > 0 and not self.stop.requested:
            self.stop.signal_number = signal.SIGTERM
        return votes[0] > 0

    def checkpoint(self, state, best):
        """checkpoints/latest (and checkpoints/best). Non-chief workers write to a temporary folder
        and delete it: every worker must take part in saving distributed variables, only one keeps it."""
        if self.info.is_chief:
            root = os.path.join(self.config.output_dir, "checkpoints")
            checkpoints.save_checkpoint(os.path.join(root, "latest"), self.model, self.optimizer, state,
                                        self.config_dict)
            if best:
                checkpoints.save_checkpoint(os.path.join(root, "best"), self.model, self.optimizer, state,
                                            self.config_dict)
        else:
            scratch = tempfile.mkdtemp(prefix=f"checkpoint-worker{self.info.worker_index}-")
            try:
                checkpoints.save_checkpoint(os.path.join(scratch, "latest"), self.model, self.optimizer, state,
                                            self.config_dict)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self.last_checkpoint = state.step


def next_test_step(state, steps_per_epoch):
    """The step after which the next test pass runs: the next multiple of ``steps_per_epoch``, so
    test passes stay at the same steps whatever the interruptions. A run resumed mid-epoch finishes
    that epoch; one stopped after an epoch's last step but before its test pass owes that pass,
    which then comes first (without it every later pass would shift by an epoch)."""
    owed = state.step > 0 and state.step % steps_per_epoch == 0 and state.epoch < state.step // steps_per_epoch
    return state.step if owed else (state.step // steps_per_epoch + 1) * steps_per_epoch


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 143/130."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is None:
            print(f"\nreceived {signal.Signals(number).name}: finishing the current step, then "
                  "checkpointing and stopping", file=sys.stderr, flush=True)
        self.signal_number = number

    @property
    def requested(self):
        return self.signal_number is not None

    @property
    def reason(self):
        """The stop reason train() reports: "sigterm" or "sigint"."""
        return "sigint" if self.signal_number == signal.SIGINT else "sigterm"

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _print_locations(output_dir, stop_reason, state, model_path):
    reasons = {"early_stopping": "early stopping", "max_epochs": "--max_epochs reached",
               "max_steps": "--max_steps reached",
               "sigterm": "SIGTERM", "sigint": "SIGINT"}
    best = (f"best test loss {state.best_loss:.4g} at epoch {state.best_epoch}" if state.epoch
            else "no test pass yet")
    print(f"\nstopped after {state.epoch} epoch(s), {state.step} step(s): {reasons[stop_reason]}; {best}", flush=True)
    lines = [("configuration", "config.json"), ("train loss per step", "train_loss.csv"),
             ("test metrics per epoch", "test_metrics.csv"), ("plots", "plots/"),
             ("TensorBoard logs", "tensorboard/"), ("checkpoints", "checkpoints/{latest,best}/")]
    if model_path:
        lines.append(("best model", "model.keras"))
    for label, name in lines:
        print(f"  {label:24s} {os.path.join(output_dir, name)}", flush=True)
    if stop_reason in ("sigterm", "sigint"):
        print(f"resume with --restore_checkpoint_filepath {output_dir}", flush=True)
