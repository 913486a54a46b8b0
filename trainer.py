"""The training loop shared by train_unet.py and train_segnet.py.

    train(config) -> summary dict              what tests call; main(model, argv) -> exit code

The pieces live by concern: flags and TrainConfig in train_config.py, losses and the per-replica
steps in steps.py, checkpoints in checkpoints.py, CSVs/TensorBoard/plots in outputs.py and plots.py,
devices, strategy and every tf.distribute call in distribute.py, metrics in metrics.py, the rules
of --time_budget (run length, self-configuration) in plan.py, the progress line in progress.py. ``train``
sets a run up in named steps (prepare_run checks everything before anything is written,
build_distribution, run_record is config.json, starting_weights, announce); ``Run`` holds its pieces,
and ``Run.loop`` reads top to bottom: train up to the end
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
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import checkpoints
import distribute
import evaluation
import imagereader
import models
import optim
import outputs
import plan
import pretext
import progress
import records
import steps
import train_config
from checkpoints import CHECKPOINT_FILES, TrainState  # noqa: F401  (re-exported for callers)
from errors import (EXIT_BAD_FLAGS, EXIT_ERROR, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM,  # noqa: F401
                    ConfigError, TrainingError)
from train_config import (TrainConfig, build_parser, config_from_args,  # noqa: F401 (TrainConfig re-exported)
                          database_flag, optimizer_settings, read_database_metadata, validate_config)


def main(model_name, argv=None, owns_process=False):
    """Entry point of train_<model>.py. Returns the process exit code. ``owns_process``: see train()."""
    return run_command(build_parser(model_name), lambda args: config_from_args(model_name, args), argv,
                       owns_process)


def run_command(parser, make_config, argv=None, owns_process=False):
    """Parse ``argv`` with ``parser``, train the TrainConfig ``make_config(args)`` describes, and turn
    errors into messages and exit codes (train_<model>.py, pretrain_unet.py). Returns the exit code.
    ``owns_process``: see train()."""
    args = train_config.parse_args(parser, argv)
    try:
        config = make_config(args)
        summary = train(config, owns_process)
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
    return (imagereader.ImageReaderError,)


def build_model(config, input_channels):
    """The network described by ``config`` (any input H, W divisible by the model's divisor)."""
    return models.build_model(config.model, config.number_classes, input_channels=input_channels,
                              base_filters=config.base_filters, batch_norm=config.batch_norm,
                              **models.shape_options(config))


class SegmentationTask:
    """What a run trains the network to do; this one, the default, segments.

    A task gives the trainer the train step (its loss), the test pass, the test_metrics.csv columns
    and plotted curves (None: outputs.py's segmentation ones) and the metrics of a test line.
    pretext.py holds the self-supervised tasks of pretrain_unet.py.
    """
    test_columns = None
    metric_curves = None

    def make_train_step(self, strategy, model, optimizer, config, global_batch):
        return steps.make_train_step(strategy, model, optimizer, config.loss, config.number_classes, global_batch,
                                     jit_compile=config.xla)

    def make_evaluator(self, model, config, info):
        return evaluation.Evaluator(model, config.model, config.test_database, config.number_classes, config.loss,
                                    shard_index=info.worker_index, shard_count=info.num_workers,
                                    options=models.shape_options(config))

    def progress_metric(self, row):
        """The test figure of the progress line: the mean foreground Dice."""
        foreground = [value for key, value in row.items() if key.startswith("dice_") and key != "dice_0"]
        return f"test foreground dice {np.nanmean(foreground):.3f}"

    def describe(self, row):
        dice = " ".join("%.3f" % row[f"dice_{k}"] for k in range(sum(1 for key in row if key.startswith("dice_"))))
        return (f"test loss {row['loss']:.4f}  accuracy {row['pixel_accuracy']:.4f}  mean IoU {row['mean_iou']:.4f}  "
                f"dice {dice}")


def make_task(config):
    """The task of a TrainConfig: a pretext task (pretrain_unet.py) or segmentation."""
    if config.pretext:
        return pretext.task_from_config(config.pretext)
    return SegmentationTask()


# ----------------------------------------------------------------------------------------------
# Setting a run up
# ----------------------------------------------------------------------------------------------

def train(config, owns_process=False):
    """Train one model as described by ``config``.

    ``owns_process``: the run is the whole process (train_<model>.py), which exits once it returns.
    SIGTERM/SIGINT are then ignored from the end of the loop and the export on, instead of getting
    their previous handlers back: the outputs are complete, but Python and TensorFlow take seconds
    to shut down, and a job's time limit or a benchmark's timeout arriving then would end a complete
    run with -15 instead of its exit code. Ignored, not handled: Python resets its own handlers to
    the default early in its shutdown but leaves an ignored signal ignored (SIGKILL still works).

    Returns:
      Summary dict: exit_code (0 finished, 130/143 stopped by a signal), stop_reason, step, epoch,
      best_loss, best_epoch, history (test loss per epoch), effective_batch, output_dir,
      model_path (None unless exported), is_chief, num_workers, towers.
    Raises:
      ConfigError / distribute.DistributionError for unusable settings, TrainingError on a
      non-finite loss, imagereader.ImageReaderError when a reader fails.
    """
    started = time.perf_counter()  # the --time_budget counts from here
    start = prepare_run(config)
    config, run_plan = start.config, start.run_plan
    # Devices and strategy come before any other TensorFlow work (see distribute.py).
    towers, reduce_to, strategy, info = build_distribution(config)

    import keras
    keras.mixed_precision.set_global_policy(steps.precision_policy(config.mixed_precision))
    keras.utils.set_random_seed(config.seed)
    global_batch = config.batch_size * len(towers) * info.num_workers
    task = make_task(config)
    with strategy.scope():
        model = build_model(config, start.input_channels)
    train_reader = evaluator = None
    if config.time_budget and run_plan is None:
        # Measuring needs the run's own model, data and devices; the plan then sets the run length
        # (and with it the learning-rate schedule) before the real optimizer exists.
        train_reader = make_train_reader(config, len(towers), info, 0)
        try:
            config, model, evaluator, run_plan = plan_by_measuring(
                task, config, strategy, info, model, train_reader, start.input_channels, global_batch,
                start.self_configuration, started)
        except BaseException:
            train_reader.shutdown()
            raise
    steps_per_epoch = config.test_every_n_steps or max(1, math.ceil(start.train_metadata["num_records"] / global_batch))
    # ConfigError (nothing written yet) for a warm-up past the end; config.json records what is used.
    settings = optimizer_settings(config, steps_per_epoch)
    config_dict = run_record(config, start, run_plan, towers, reduce_to, info, steps_per_epoch, settings)
    with strategy.scope():
        optimizer = optim.make_optimizer(settings)
        optimizer.build(model.trainable_variables)
    state, resumed = starting_weights(config, start, model, optimizer)
    if resumed and info.is_chief:
        checkpoints.complete_best(start.checkpoint_dir, state)
    if train_reader is None:
        train_reader = make_train_reader(config, len(towers), info, state.step)
    if info.is_chief:
        announce(config, config_dict, start, strategy, towers, reduce_to, info, run_plan, resumed)

    run_outputs = outputs.Outputs(config.output_dir, config.number_classes, info.is_chief,
                                  state if resumed else None, test_columns=task.test_columns,
                                  metric_curves=task.metric_curves)
    run = Run(config, config_dict, strategy, info, model, optimizer, train_reader, run_outputs,
              steps_per_epoch, global_batch, last_checkpoint=state.step if resumed else None,
              evaluator=evaluator, deadline=training_deadline(run_plan, started, info, evaluator), task=task,
              run_plan=run_plan)
    model_path = None
    with StopSignals(ignore_afterwards=owns_process) as stop:
        try:
            with train_reader:
                stop_reason = run.loop(state, stop)
        finally:
            run.end_progress_line()
            run_outputs.close()
        exit_code = {"sigterm": EXIT_SIGTERM, "sigint": EXIT_SIGINT}.get(stop_reason, EXIT_OK)
        if exit_code == EXIT_OK and info.is_chief:
            # A signal now (a job's time limit, a benchmark's timeout) waits for the export, a few
            # seconds, instead of killing the process with the run complete and model.keras unwritten.
            stop.doing = "finishing the export of model.keras (a few seconds) first"
            model_path = checkpoints.export_model(config.output_dir, config_dict)
    if info.is_chief:
        _print_locations(config.output_dir, stop_reason, state, model_path)
    return {"exit_code": exit_code, "stop_reason": stop_reason, "step": state.step, "epoch": state.epoch,
            "best_loss": state.best_loss, "best_epoch": state.best_epoch, "history": list(state.history),
            "effective_batch": global_batch, "output_dir": config.output_dir, "model_path": model_path,
            "is_chief": info.is_chief, "num_workers": info.num_workers, "towers": towers}


@dataclasses.dataclass
class RunStart:
    """What prepare_run settled before anything is written."""
    config: TrainConfig  # with what a resumed or fine-tuned run keeps, and self-configured flags
    train_metadata: dict
    test_metadata: dict
    fingerprints: dict  # {"train": ..., "test": ...}: checkpoints.database_fingerprint of each
    input_channels: int
    checkpoint_dir: str = None  # --restore_checkpoint_filepath's checkpoint folder
    saved: dict = None  # its config.json
    run_plan: plan.RunPlan = None  # the plan a resumed --time_budget run keeps
    self_configuration: dict = None  # {flag: {value, reason}} chosen by self_configure
    init_dir: str = None  # the starting weights' folder: --init_from, or what a resumed run began from
    database_warnings: list = dataclasses.field(default_factory=list)  # fine-tuning on other databases


def prepare_run(config):
    """RunStart: the databases' metadata, the checkpoint to resume or start from, what a resumed run
    keeps, the self-configured flags, all checked. Everything that can refuse the run comes before
    anything is written: a refused run creates nothing."""
    train_metadata = read_database_metadata(config.train_database, "train", database_flag(config, "train"))
    test_metadata = read_database_metadata(config.test_database, "test", database_flag(config, "test"))
    checkpoint_dir = find_restore_checkpoint(config.restore_checkpoint_filepath)
    saved, run_plan, self_configuration = None, None, None
    fingerprints = {"train": checkpoints.database_fingerprint(train_metadata),
                    "test": checkpoints.database_fingerprint(test_metadata)}
    if checkpoint_dir:
        saved = checkpoints.read_config(checkpoint_dir)
        # Its weights fit one network: a width or depth not given now is the checkpoint's.
        config = checkpoints.network_of_weights(config, saved)
        if checkpoints.database_differences(checkpoint_dir, saved, config, fingerprints):
            # Fine-tuning on other databases is a new run: its own length (--max_steps or a new
            # --time_budget, which plans what the old run did not choose for itself), and what the
            # old run chose for itself (its tile, batch).
            chosen = [name for name in config.self_configure if name in (saved.get("self_configuration") or {})
                      and name in saved]
            config = dataclasses.replace(config, self_configure=[n for n in config.self_configure if n not in chosen],
                                         **{name: saved[name] for name in chosen})
        else:
            config, run_plan = kept_plan(config, saved, checkpoint_dir)
            changed = pretext.changed_settings(saved.get("pretext") or {}, config.pretext or {})
            if saved.get("pretext") and config.pretext and changed:
                # Another task, share or window changes the test pass's masked pixels: its losses
                # could not pick the best checkpoint across the two.
                raise ConfigError(f"--restore_checkpoint_filepath {checkpoint_dir} was pretrained with other "
                                  f"settings ({', '.join(changed)}); resume with the same ones, or pretrain "
                                  "anew in another --output_dir")
    check_output_dir_free(config, checkpoint_dir)
    init_dir = find_init_checkpoint(config, checkpoint_dir)
    init_saved = checkpoints.read_config(init_dir) if init_dir else None
    if init_dir:
        # Its weights fit one network: a width or depth not given comes from it, never from the
        # plan (a planned or halved width restored no layer at all).
        config = checkpoints.network_of_weights(config, init_saved)
    if config.time_budget and config.self_configure and run_plan is None:
        config, self_configuration = self_configure(config, train_metadata)
    validate_config(config, train_metadata, test_metadata)
    input_channels = train_metadata["channels"]
    if init_dir:
        checkpoints.check_compatible(init_dir, init_saved, config, input_channels, flag="--init_from")
    database_warnings = []
    if checkpoint_dir:
        checkpoints.check_compatible(checkpoint_dir, saved, config, input_channels)
        database_warnings = checkpoints.database_differences(checkpoint_dir, saved, config, fingerprints)
        # A resumed fine-tuning run still records what its weights began from.
        init_dir = init_dir or saved.get("init_from_checkpoint")
    return RunStart(config=config, train_metadata=train_metadata, test_metadata=test_metadata,
                    fingerprints=fingerprints, input_channels=input_channels, checkpoint_dir=checkpoint_dir,
                    saved=saved, run_plan=run_plan, self_configuration=self_configuration, init_dir=init_dir,
                    database_warnings=database_warnings)


def build_distribution(config):
    """(towers, where gradients are summed, strategy, distribute.ClusterInfo) of this process."""
    cluster = distribute.detect_cluster(os.environ)
    towers = distribute.configure_devices(config.cpu_towers, config.gpus)
    reduce_to = distribute.parse_reduction_location(
        config.gradient_update_location, len(towers) if towers[0].startswith("/gpu") else 0)
    distribute.check_xla(config.xla, config.model)
    strategy = distribute.build_strategy(towers, reduce_to, cluster)
    return towers, reduce_to, strategy, distribute.cluster_info(strategy)


def run_record(config, start, run_plan, towers, reduce_to, info, steps_per_epoch, settings):
    """The run's config.json: the TrainConfig and what the run resolved (devices, run length,
    warm-up, databases, plan, self-configuration)."""
    config_dict = dict(dataclasses.asdict(config), input_channels=start.input_channels,
                       effective_batch=config.batch_size * len(towers) * info.num_workers,
                       towers=towers, num_workers=info.num_workers,
                       reduction=distribute.reduction_in_use(towers, reduce_to, info.num_workers),
                       steps_per_epoch=steps_per_epoch, run_length=settings.total_steps,
                       warmup_steps=settings.warmup_steps,
                       tool_version=records.TOOL_VERSION, normalization=checkpoints.NORMALIZATION,
                       train_database_fingerprint=start.fingerprints["train"],
                       test_database_fingerprint=start.fingerprints["test"],
                       init_from_checkpoint=start.init_dir)
    if run_plan is not None:
        config_dict["plan"] = run_plan.to_dict()
    if start.self_configuration is not None:
        config_dict["self_configuration"] = start.self_configuration
    elif start.saved and start.saved.get("self_configuration") and run_plan is not None:
        config_dict["self_configuration"] = start.saved["self_configuration"]
    return config_dict


def starting_weights(config, start, model, optimizer):
    """(TrainState, resumed): restore --restore_checkpoint_filepath into the model and optimizer, or
    load --init_from's weights, or neither (a fresh TrainState)."""
    state, resumed = TrainState(), False
    if start.checkpoint_dir:
        state, resumed = checkpoints.restore_checkpoint(start.checkpoint_dir, model, optimizer, config,
                                                        start.input_channels, fine_tune=bool(start.database_warnings))
    if start.init_dir and not start.checkpoint_dir:
        checkpoints.initialise_from(start.init_dir, model, start.input_channels)
    return state, resumed


def announce(config, config_dict, start, strategy, towers, reduce_to, info, run_plan, resumed):
    """The chief's start of a run: create --output_dir with config.json (and a resumed run's earlier
    outputs), then print the configuration, devices, batch, warnings, self-configuration and plan."""
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
          f"{info.num_workers} worker(s) = {config_dict['effective_batch']}", flush=True)
    for warning in fixed_crop_warnings(config, start.train_metadata):
        print(warning, file=sys.stderr, flush=True)
    for name, choice in (config_dict.get("self_configuration") or {}).items():
        print(f"self-configuration: --{name} {choice['value']}: {choice['reason']}", flush=True)
    if run_plan is not None:
        print(run_plan.line(), flush=True)
    source_dir = checkpoints.output_dir_of(start.checkpoint_dir) if start.checkpoint_dir else None
    if resumed and source_dir is not None and os.path.abspath(config.output_dir) != source_dir:
        checkpoints.copy_previous_run(source_dir, config.output_dir)
    if start.checkpoint_dir:
        for warning in start.database_warnings:
            print(warning, file=sys.stderr, flush=True)


def _create_output_dir(output_dir, config_dict):
    """Create --output_dir (ConfigError when impossible) and write its config.json."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot create the folder ({error.strerror})") from None
    checkpoints.write_json(os.path.join(output_dir, "config.json"), config_dict)


def kept_plan(config, saved, checkpoint_dir):
    """(config, RunPlan or None): a resumed run of a planned run keeps its plan (run length, test
    spacing, learning-rate schedule) and its self-configured flags unless given now, whatever
    --time_budget says now, so the schedule continues where it was; ConfigError for --time_budget on
    a resumed run that had none."""
    if saved.get("number_classes") != config.number_classes:  # transfer learning: a new run
        return config, None
    if not saved.get("plan"):
        if config.time_budget:
            raise ConfigError(f"--time_budget {config.time_budget}: the checkpoint {checkpoint_dir} is of a run "
                              "without a time budget; resume it without --time_budget (it keeps its run "
                              "length), or start a new run")
        return config, None
    run_plan = plan.RunPlan.from_dict(saved["plan"])
    # The shape and capacity chosen then, for the flags left to self-configuration now.
    chosen = {name: saved[name] for name in config.self_configure if name in saved}
    # The plan replaces --time_budget (config.json's "plan" holds the budget it was made for).
    config = dataclasses.replace(config, **chosen, time_budget=None, max_steps=run_plan.steps,
                                 test_every_n_steps=saved.get("steps_per_epoch") or run_plan.test_every,
                                 lr_schedule=saved.get("lr_schedule"), warmup_steps=saved.get("warmup_steps"))
    print(f"resumed run keeps its {plan.format_duration(run_plan.budget_s)} plan: {run_plan.steps:,} steps, "
          f"a test pass every {config.test_every_n_steps:,}", flush=True)
    return config, run_plan


def plan_by_measuring(task, config, strategy, info, model, train_reader, input_channels, global_batch,
                      self_configuration, started):
    """(config with the planned run length, model, evaluator, RunPlan) of a --time_budget run.

    Starts ``train_reader`` (the run goes on with it). When the measured speed buys too few steps and
    --base_filters was self-configured, the width is halved (noted in ``self_configuration``), the
    model rebuilt and measured again; otherwise ConfigError with the estimate.
    """
    train_reader.startup()
    evaluator = task.make_evaluator(model, config, info)
    while True:
        try:
            run_plan = measured_plan(task, config, strategy, info, model, train_reader, evaluator, global_batch,
                                     started)
            break
        except plan.PlanError as error:
            if "base_filters" not in config.self_configure or config.base_filters // 2 < plan.MIN_FILTERS:
                raise ConfigError(str(error)) from None
            config = dataclasses.replace(config, base_filters=config.base_filters // 2)
            self_configuration["base_filters"] = {
                "value": config.base_filters,
                "reason": f"halved from {config.base_filters * 2}: that width bought only about {error.steps} "
                          f"steps of the {plan.MIN_STEPS} a run needs in the budget"}
            with strategy.scope():
                model = build_model(config, input_channels)
            evaluator = task.make_evaluator(model, config, info)
    config = dataclasses.replace(config, max_steps=run_plan.steps,
                                 test_every_n_steps=config.test_every_n_steps or run_plan.test_every)
    return config, model, evaluator, run_plan


def training_deadline(run_plan, started, info, evaluator):
    """The perf_counter time after which a freshly planned run stops training early (then its last
    test pass and the export still fit the budget), or None: a machine slower than measured must
    not overrun the budget. Only for one worker (workers would have to agree on the moment) and not
    for a resumed run (its budget started in an earlier process)."""
    if run_plan is None or evaluator is None or info.num_workers > 1:
        return None
    return started + run_plan.budget_s - run_plan.test_s - run_plan.export_s


def self_configure(config, train_metadata):
    """(config, {flag: {value, reason}}): the flags in config.self_configure set from the training
    data and the machine by plan.py's rules; the others as given."""
    device, memory, memory_reason = machine_profile(config)
    # Objects and crops from the training images (the test pass tiles whole images as inference.py).
    choices = plan.choose_shape(train_metadata, config.model, device,
                                lambda depth: 2 ** depth if config.model == "unet" else models.SIZE_DIVISOR[config.model])
    tile = choices["tile_size"][0] if "tile_size" in config.self_configure else config.tile_size
    choices.update(plan.choose_capacity(device, memory, plan.parse_duration(config.time_budget), tile))
    if "batch_size" in choices:
        value, reason = choices["batch_size"]
        choices["batch_size"] = (value, f"{reason} ({memory_reason})")
    config, record = plan.apply_choices(config, choices, config.self_configure)
    return config, record


def machine_profile(config):
    """("gpu" or "cpu", memory in bytes of one device, where the figure comes from), without
    configuring TensorFlow's devices (that comes later, see distribute.py): nvidia-smi for GPUs,
    the physical RAM for a CPU. GPUs count only when TensorFlow sees them and --gpus selects one
    (CUDA_VISIBLE_DEVICES="" or a TensorFlow without CUDA trains on the CPU, whatever nvidia-smi
    lists)."""
    if not config.cpu_towers and distribute.selected_gpu_count(config.gpus) and shutil.which("nvidia-smi"):
        try:
            result = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, timeout=30, check=True)
            sizes = [int(line) for line in result.stdout.split() if line.strip().isdigit()]
        except (OSError, subprocess.SubprocessError, ValueError):
            sizes = []
        if sizes:
            return "gpu", min(sizes) * 2 ** 20, "the smallest GPU's memory by nvidia-smi"
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the physical RAM"


def measured_plan(task, config, strategy, info, model, train_reader, evaluator, global_batch, started):
    """The RunPlan of --time_budget from this run's measured speeds (plan.PlanError when too short)."""
    compile_s, step_s, test_s, save_s = measure_speed(config, strategy, info, model, train_reader, evaluator,
                                                      global_batch, task)
    # A pass also writes checkpoints/latest and often best (weights and optimizer state: about 3x the
    # weights each); the export rebuilds the model (about 1 s on a CPU), loads and saves it, and the
    # readers stop (about 1 s).
    spent = distribute.sum_across_workers(strategy, np.array([time.perf_counter() - started]))[0] / info.num_workers
    return plan.plan_run(plan.parse_duration(config.time_budget), spent, step_s, test_s + 4 * save_s,
                         global_batch, compile_s=compile_s, export_s=2.0 + 3 * save_s,
                         test_every=config.test_every_n_steps)


PROBE_STEPS = 8  # timed steps after the first (compiling) one; their mean is the step time


def measure_speed(config, strategy, info, model, train_reader, evaluator, global_batch, task):
    """(compile_s, step_s, test_s, save_s) of this run, the mean over the workers so all plan alike.

    The measuring steps use a throwaway optimizer at learning rate 0 and the weights (batch-norm
    statistics included) are put back afterwards: the run starts from the weights a run without a
    budget starts from. The real train step is traced again (``compile_s``) with the real optimizer,
    whose schedule needs the planned length. test_s is the first pass, compiling included, so the
    plan errs on the short side.
    """
    with strategy.scope():
        probe_optimizer = optim.make_optimizer(optim.OptimizerSettings(
            optimizer=config.optimizer, learning_rate=0.0, mixed_precision=config.mixed_precision))
        probe_optimizer.build(model.trainable_variables)
    probe_step = task.make_train_step(strategy, model, probe_optimizer, config, global_batch)
    weights = model.get_weights()
    local_replicas = distribute.local_replica_count(strategy)
    times = []
    for _ in range(1 + PROBE_STEPS):
        start = time.perf_counter()
        batches = [train_reader.get_batch() for _ in range(local_replicas)]
        float(probe_step(distribute.distribute_batches(strategy, batches)))
        times.append(time.perf_counter() - start)
    model.set_weights(weights)
    # The mean, not the median: the run pays for the slow steps of a shared machine too.
    step_s = float(np.mean(times[1:]))
    _, _, test_s = evaluator.run(combine=lambda totals: distribute.sum_across_workers(strategy, totals))
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        model.save_weights(os.path.join(scratch, "probe.weights.h5"))
        save_s = time.perf_counter() - start
    figures = np.array([max(times[0] - step_s, 0.0), step_s, test_s, save_s])
    return tuple(float(x) for x in distribute.sum_across_workers(strategy, figures) / info.num_workers)


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


# What an earlier run leaves in its --output_dir.
RUN_FILES = ("config.json", "train_loss.csv", "test_metrics.csv", "checkpoints", "model.keras")


def check_output_dir_free(config, checkpoint_dir):
    """ConfigError when --output_dir holds an earlier run that this run does not resume: a new run
    there would replace its history (the CSVs at once, its checkpoints and model.keras later)."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(config.output_dir, name))]
    if not found:
        return
    if checkpoint_dir and os.path.realpath(checkpoints.output_dir_of(checkpoint_dir) or checkpoint_dir) \
            == os.path.realpath(config.output_dir):
        return
    how = (f"resume it with --restore_checkpoint_filepath {config.output_dir}, or give another --output_dir"
           if "checkpoints" in found else "it has no checkpoint to resume: delete it, or give another --output_dir")
    raise ConfigError(f"--output_dir {config.output_dir} holds an earlier run ({', '.join(found)}); {how} (a new "
                      "run there would replace its history)")


def find_init_checkpoint(config, checkpoint_dir):
    """The checkpoint folder --init_from means (best first); None when not given or when
    --restore_checkpoint_filepath resumes the run (its weights come from there). ConfigError naming
    the flag otherwise, before anything is written."""
    if not config.init_from:
        return None
    if checkpoint_dir:
        if checkpoints.read_config(checkpoint_dir).get("number_classes") == config.number_classes:
            print(f"--init_from {config.init_from} is not used: the run resumes from {checkpoint_dir}", flush=True)
            return None
        raise ConfigError(f"--init_from {config.init_from} and --restore_checkpoint_filepath "
                          f"{config.restore_checkpoint_filepath} (transfer learning) both give the starting "
                          "weights; give one of them")
    found = checkpoints.find_checkpoint(config.init_from, prefer="best",
                                        required=(checkpoints.WEIGHTS_FILE, "config.json"))
    if found is None:
        raise ConfigError(f"--init_from {config.init_from}: no checkpoint there; expected a pretrain_unet.py "
                          f"output folder (holding checkpoints/best or checkpoints/latest) or a checkpoint "
                          f"folder holding {checkpoints.WEIGHTS_FILE} and config.json")
    return found


def make_train_reader(config, towers, info, start_step):
    """The training ImageReader of this worker (not started). (The test pass reads its whole test
    images itself: see evaluation.py.)"""
    # A resumed run draws a new sampling stream instead of replaying the batches already seen.
    seed = config.seed + 7919 * start_step
    common = dict(num_workers=config.reader_count * towers, tile_size=config.tile_size,
                  shard_index=info.worker_index, shard_count=info.num_workers)
    try:
        train_reader = imagereader.ImageReader(
            config.train_database, config.batch_size, use_augmentation=config.use_augmentation,
            balance_classes=config.balance_classes, augmentation=config.augmentation, seed=seed,
            foreground_crop_fraction=config.foreground_crop_fraction, use_masks=not config.pretext, **common)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    return train_reader


def fixed_crop_warnings(config, train_metadata):
    """Warnings (lines) when the training crops cannot move: a database tiled by build_lmdb.py at or
    below the crop size holds records no larger than a crop, and a crop never crosses a record's
    border, so every crop is a whole stored tile (the network sees a fixed grid of tiles) and
    --foreground_crop_fraction cannot place a crop anywhere. Empty when crops can move."""
    tiled_at = train_metadata.get("tile_size")
    largest = max(max(shape[0], shape[1]) for shape in train_metadata["image_shapes"])
    if not tiled_at or largest > config.tile_size:
        return []
    lines = [f"warning: {database_flag(config, 'train')} {config.train_database} was built with --tile_size {tiled_at} "
             f"(records of at most {largest} px) and --tile_size {config.tile_size} crops it, so every crop is "
             "a whole stored tile: training sees a fixed grid of tiles, crop positions never vary and crops "
             "never cross tile borders (flips, rotations and intensity changes still vary). For random crops, "
             "rebuild the database with build_lmdb.py without --tile_size (whole images) or with a --tile_size "
             f"larger than {config.tile_size} (e.g. {2 * config.tile_size})"]
    if config.foreground_crop_fraction > 0:
        lines.append(f"warning: --foreground_crop_fraction {config.foreground_crop_fraction:g} does nothing with "
                     "this database: a crop of a record no larger than the crop is the whole record")
    return lines


# ----------------------------------------------------------------------------------------------
# The run: its pieces, the loop, and the loop's helpers
# ----------------------------------------------------------------------------------------------

class Run:
    """One training run: the model, its steps, readers and outputs, and the loop over them."""

    def __init__(self, config, config_dict, strategy, info, model, optimizer, train_reader, outputs,
                 steps_per_epoch, global_batch, last_checkpoint=None, evaluator=None, deadline=None, task=None,
                 run_plan=None):
        self.config, self.config_dict = config, config_dict
        self.task = task or SegmentationTask()
        self.strategy, self.info = strategy, info
        self.model, self.optimizer = model, optimizer
        self.train_reader, self.outputs = train_reader, outputs
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.optimizer_settings = optimizer_settings(config, steps_per_epoch)
        self.local_replicas = distribute.local_replica_count(strategy)
        self.train_step = self.task.make_train_step(strategy, model, optimizer, config, global_batch)
        # A planned run passes the evaluator that measured the test pass (its predictor is compiled).
        self.evaluator = evaluator or self.task.make_evaluator(model, config, info)
        self.sync_statistics = distribute.make_sync_statistics(strategy, model.non_trainable_variables)
        self.last_checkpoint = last_checkpoint  # step of the last checkpoint written or restored
        self.deadline = deadline  # perf_counter time when --time_budget ends training (training_deadline)
        # A fresh planned run (it has a deadline) fits its length to its own speeds after its test
        # passes (see replan): step_seconds holds the step times until the first re-plan, then a
        # window (start time, step, seconds of test passes in it) runs from each adopted re-plan;
        # test_pass_seconds holds every pass's time with its checkpoints.
        self.run_plan = run_plan if deadline is not None else None
        self.step_seconds, self.test_pass_seconds = [], []
        self.replan_mark, self.window_start, self.window_tests = None, None, 0.0
        # The whole run's progress with an ETA (chief only), and the last test pass's figure for it.
        self.progress = (progress.ProgressLine(config_dict["run_length"])
                         if info.is_chief and config_dict["run_length"] else None)
        self.test_metric = None
        self.stop = None

    def loop(self, state, stop):
        """The outer loop: train an epoch, test, log, checkpoint, decide. Returns the stop reason."""
        self.stop = stop
        run_start, wall_before = time.perf_counter(), state.wall_time_s
        starvation_mark = self.train_reader.starvation_seconds
        while True:
            reason = self.stop_reason(state)  # a resumed run that had already stopped
            if reason:
                return reason
            # ---- train up to the step of the next test pass (the last one comes at --max_steps)
            epoch_end = next_test_step(state, self.steps_per_epoch)
            if self.config.max_steps:
                epoch_end = min(epoch_end, self.config.max_steps)
            while state.step < epoch_end and not self.stop_requested() and not self.out_of_time():
                if not self.train_one_step(state):
                    break
            state.wall_time_s = wall_before + time.perf_counter() - run_start
            if self.sync_statistics is not None:
                self.sync_statistics()
            # Voted: a signal that came during the epoch's last step reached one worker after the
            # loop's last vote; that worker alone would stop while the others entered the test pass.
            if self.stop_requested():
                self.checkpoint(state, best=False, stopping=True)
                return stop.reason

            # ---- test pass, logging, checkpoints, early stopping
            result = self.test_pass()
            if result is None:  # stopped during the test pass: the resumed run repeats it first
                self.checkpoint(state, best=False, stopping=True)
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
            checkpoint_start = time.perf_counter()
            self.checkpoint(state, best=improved)
            # Out of time, a re-plan would shorten the plan to the step reached, and the run would
            # report --max_steps reached with a schedule that never ended.
            if self.run_plan is not None and not self.finished(state) and not self.out_of_time():
                self.replan(state, test_seconds + time.perf_counter() - checkpoint_start)
            reason = self.stop_reason(state) or ("time_budget" if self.out_of_time() else None)
            if reason:
                return reason

    def stop_reason(self, state):
        """Why the run ends after its latest test pass (early stopping, --max_epochs, --max_steps), or
        None. Also asked before training, so that resuming a finished run trains no further epoch."""
        if state.epochs_without_improvement >= self.config.early_stopping:
            return "early_stopping"
        if self.config.max_epochs and state.epoch >= self.config.max_epochs:
            return "max_epochs"
        if self.finished(state):
            return "max_steps"
        return None

    def out_of_time(self):
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def replan(self, state, test_s):
        """Fit the run length to the speeds measured in the run (plan.replan) after a test pass: the
        first time always, later when the end moves by more than plan.REPLAN_TOLERANCE (a shared
        machine's speed drifts: a run that got slower would be cut by the deadline before its
        schedule ends, one that got faster would end early). The schedule's end moves with it (the
        warm-up stays as it was), and config.json records the new plan, which a resumed run keeps.
        ``test_s``: this pass's time with its checkpoints."""
        first = self.run_plan.replanned_from is None
        now = time.perf_counter()
        self.test_pass_seconds.append(test_s)
        if first:
            # The first step of this process traces the train step (the plan reserved compile_s for it).
            timed = self.step_seconds[1:]
            if not timed:
                return
            step_s = float(np.mean(timed))
        else:
            # Later: the window's wall time without its test passes, per step, so that everything
            # between steps (logging, waiting for the readers) is paid for too.
            self.window_tests += test_s
            if state.step <= self.replan_mark:
                return
            step_s = (now - self.window_start - self.window_tests) / (state.step - self.replan_mark)
        end = self.deadline + self.run_plan.test_s  # the planned end, the export excluded
        # Later, the median pass: the first one in the run is slower (it warms the predictor's caches).
        new = plan.replan(self.run_plan, state.step, end - now, step_s,
                          test_s if first else float(np.median(self.test_pass_seconds)))
        steps = max(new.steps, state.step, self.optimizer_settings.warmup_steps + 1)
        new = dataclasses.replace(new, steps=steps)
        if not plan.worth_replanning(self.run_plan, new):
            return  # keep measuring: the window grows until the speed has moved enough to matter
        previous, since = self.run_plan.steps, self.replan_mark
        self.replan_mark, self.window_start, self.window_tests = state.step, time.perf_counter(), 0.0
        self.run_plan, self.deadline = new, end - new.test_s
        self.config = dataclasses.replace(self.config, max_steps=steps,
                                          warmup_steps=self.optimizer_settings.warmup_steps)
        self.optimizer_settings = optimizer_settings(self.config, self.steps_per_epoch)
        self.config_dict.update(max_steps=steps, run_length=steps, warmup_steps=self.optimizer_settings.warmup_steps,
                                plan=new.to_dict())
        if self.progress is not None:
            self.progress.total = steps
        if self.info.is_chief:
            checkpoints.write_json(os.path.join(self.config.output_dir, "config.json"), self.config_dict)
            if first:
                print(f"re-plan after the first test pass: {new.step_s:.3g} s/step and {new.test_s:.3g} s per test "
                      f"pass measured in the run: {steps:,} steps instead of {previous:,}", flush=True)
            else:
                print(f"re-plan at step {state.step:,}: {new.step_s:.3g} s/step since step {since:,} and "
                      f"{new.test_s:.3g} s per test pass: {steps:,} steps instead of {previous:,}", flush=True)

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
        # The schedule follows the trainer's step, not optimizer.iterations: under float16 the inner
        # optimizer's counter does not advance on an update skipped for overflowing gradients.
        optim.set_step(self.optimizer, self.optimizer_settings, state.step)
        rate = optim.current_learning_rate(self.optimizer) if self.logs_step(state.step + 1) else None
        loss = float(self.train_step(distribute.distribute_batches(self.strategy, batches)))
        self.check_finite(loss, state.step + 1)
        state.step += 1
        step_time = time.perf_counter() - step_start
        if self.run_plan is not None and self.run_plan.replanned_from is None:
            self.step_seconds.append(step_time)
        self.log_step(state.step, loss, step_time, rate)
        if self.progress is not None:
            self.progress.update(state.step, metric=self.test_metric)
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
            self.end_progress_line()
            print(f"step {step:7d}  loss {loss:.4f}  lr {learning_rate:.6g}  step {step_time:.3f}s  "
                  f"{images_per_s:7.1f} img/s  queue {self.train_reader.get_queue_size()}", flush=True)
            self.outputs.log_scalars(step, {"train/loss": loss, "train/images_per_s": images_per_s,
                                            "train/learning_rate": learning_rate})

    def print_test_line(self, state, row, improved, seconds):
        if self.info.is_chief:
            self.test_metric = self.task.progress_metric(row)
            self.end_progress_line()
            verdict = "(best)" if improved else f"({state.epochs_without_improvement} without improvement)"
            print(f"epoch {state.epoch:4d}  step {state.step:7d}  {self.task.describe(row)}  "
                  f"{verdict}  test {seconds:.1f}s ({seconds / max(row['test_pixels'] / 1e6, 1e-9):.2f} s/MP)",
                  flush=True)

    def end_progress_line(self):
        if self.progress is not None:
            self.progress.end_line()

    def stop_requested(self):
        """Whether to stop now; with several workers, true as soon as any worker got a signal, so all
        of them stop at the same step instead of waiting in a collective for the missing one."""
        if self.info.num_workers == 1:
            return self.stop.requested
        votes = distribute.sum_across_workers(self.strategy, np.array([1.0 if self.stop.requested else 0.0]))
        if votes[0] > 0 and not self.stop.requested:
            self.stop.signal_number = signal.SIGTERM
        return votes[0] > 0

    def checkpoint(self, state, best, stopping=False):
        """checkpoints/latest (and checkpoints/best). Non-chief workers write to a temporary folder
        and delete it: every worker must take part in saving distributed variables, only one keeps it.
        ``stopping``: the run stops after it, so every worker waits until all have saved (a
        non-chief's small save ends first, and srun --kill-on-bad-exit then killed the chief
        mid-save when its exit code 143 came in)."""
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
        if stopping and self.info.num_workers > 1:
            distribute.sum_across_workers(self.strategy, np.zeros(1))  # a barrier
        self.last_checkpoint = state.step


def next_test_step(state, steps_per_epoch):
    """The step after which the next test pass runs: the next multiple of ``steps_per_epoch``, so
    test passes stay at the same steps whatever the interruptions. A run resumed mid-epoch finishes
    that epoch; one stopped after an epoch's last step but before its test pass owes that pass,
    which then comes first (without it every later pass would shift by an epoch)."""
    owed = state.step > 0 and state.step % steps_per_epoch == 0 and state.epoch < state.step // steps_per_epoch
    return state.step if owed else (state.step // steps_per_epoch + 1) * steps_per_epoch


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 143/130 (the
    export of a complete run finishes and the run exits 0). ``doing``: what the message says
    happens next; the trainer changes it when the loop is over and the export begins.
    ``ignore_afterwards``: on leaving, ignore both signals instead of putting the previous handlers
    back (a process that only exits afterwards: see train())."""

    def __init__(self, doing="finishing the current step, then checkpointing and stopping", ignore_afterwards=False):
        self.signal_number = None
        self._previous = {}
        self.doing = doing
        self._ignore_afterwards = ignore_afterwards

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is None:
            print(f"\nreceived {signal.Signals(number).name}: {self.doing}", file=sys.stderr, flush=True)
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
            signal.signal(number, signal.SIG_IGN if self._ignore_afterwards else handler)


def _print_locations(output_dir, stop_reason, state, model_path):
    reasons = {"early_stopping": "early stopping", "max_epochs": "--max_epochs reached",
               "max_steps": "--max_steps reached",
               "time_budget": "--time_budget ran out before the planned steps (slower than measured)",
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
