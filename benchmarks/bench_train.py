"""Training images/s of the trainer's step loop against a plain Keras model.fit of the same model.

Both sides train build_unet(2 classes, base_filters 16) on 128 x 128 tiles, batch 8, Adam 1e-4, the
trainer's cross-entropy (steps.per_image_loss), on the CPU:
  - trainer: the trainer's own step, trainer.Run.train_one_step: the MirroredStrategy of
    distribute.py (one CPU tower, as `train_unet.py` builds it on this machine), steps.make_train_step,
    batches from the real ImageReader made by trainer.make_train_reader (augmentation on, --reader_count
    worker processes), distribute.distribute_batches, the finite-loss check and Run.log_step
    (train_loss.csv every step, a progress line and TensorBoard scalars every 10 steps). Reader cost is included, as in real training: the workers share the CPU with
    TensorFlow.
  - model.fit: the same network built outside any strategy, compiled with the same loss and
    optimizer (jit_compile=False: Keras' "auto" also disables XLA on CPU-only machines), fed the
    same augmented batches from memory (recorded from the trainer's reader beforehand).
Start-up, tracing and test passes are excluded: each side first runs --warmup untimed steps; then
--rounds rounds each time 1 + --steps steps of the trainer and then of model.fit, from the end of the
first step to the end of the last. The machine is shared, so besides the best rate of each side the
line gives the median ratio of the two rates of the same round and the CPU milliseconds per image
(trainer: its process plus the reader workers), which depend little on what else is running, and
the trainer's host work per step outside the compiled step (queue read, hand-over to the strategy,
loss check, logging): what a prefetching thread could hide at most.
Target: trainer >= 0.95 x model.fit (readers, towers and logging cost under 5%).

Data: the nist_colonies images (../shared/data/nist_colonies, 256 x 256 uint16) when present, else
64 synthetic 256 x 256 records; written into a temporary LMDB.

Run from the repo root: .venv/bin/python benchmarks/bench_train.py
"""
import argparse
import contextlib
import dataclasses
import io
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import distribute  # noqa: E402
import optim  # noqa: E402
import outputs  # noqa: E402
import records  # noqa: E402
import steps  # noqa: E402
import train_config  # noqa: E402
import trainer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nist_colonies"
MODEL, NUMBER_CLASSES, BASE_FILTERS, TILE, BATCH, LEARNING_RATE = "unet", 2, 16, 128, 8, 1e-4


@dataclasses.dataclass
class BenchConfig:
    """Timed steps per round and side, untimed warm-up steps, rounds, reader processes."""
    steps: int = 15
    warmup: int = 5
    rounds: int = 6
    reader_count: int = 1


def write_training_database(path):
    """nist_colonies into an LMDB at ``path`` when present, else synthetic records. Returns a label."""
    import tifffile

    names = sorted(p.name for p in (DATA / "images").glob("*.tif")) if (DATA / "masks").is_dir() else []
    if names:
        pairs = ((tifffile.imread(DATA / "images" / n), tifffile.imread(DATA / "masks" / n),
                  {"image": n, "mask": n}) for n in names)
        label = f"nist_colonies ({len(names)} images)"
    else:
        rng = np.random.default_rng(0)

        def synthetic():
            for i in range(64):
                mask = (rng.random((16, 16)) < 0.3).repeat(16, 0).repeat(16, 1).astype(np.uint8)
                image = 1000 * mask + rng.normal(500, 50, mask.shape)
                yield image.astype(np.uint16), mask, {"image": f"syn_{i}", "mask": f"syn_{i}"}
        pairs, label = synthetic(), "synthetic (64 images)"
    records.write_database(str(path), pairs, {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    return label


class TrainerLoop:
    """The trainer's model, strategy, step and reader, and its per-step loop body."""

    def __init__(self, config, database, output_dir):
        self.config = trainer.TrainConfig(
            model=MODEL, train_database=str(database), test_database=str(database),
            output_dir=str(output_dir), batch_size=BATCH, number_classes=NUMBER_CLASSES, tile_size=TILE,
            learning_rate=LEARNING_RATE, reader_count=config.reader_count, base_filters=BASE_FILTERS,
            gpus="none", loss="ce")
        # Same order as trainer.train: devices and strategy before any other TensorFlow work.
        towers = distribute.configure_devices(self.config.cpu_towers, self.config.gpus)
        strategy = distribute.build_strategy(towers, distribute.parse_reduction_location(None, 0))
        info = distribute.cluster_info(strategy)
        with strategy.scope():
            model = trainer.build_model(self.config, input_channels=1)
            optimizer = optim.make_optimizer(train_config.optimizer_settings(self.config, None))
            optimizer.build(model.trainable_variables)
        train_reader = trainer.make_train_reader(self.config, len(towers), info, 0)
        run_outputs = outputs.Outputs(str(output_dir), NUMBER_CLASSES, enabled=True)
        self.run = trainer.Run(self.config, dataclasses.asdict(self.config), strategy, info, model, optimizer,
                               train_reader, run_outputs, steps_per_epoch=10 ** 9,
                               global_batch=BATCH)
        self.stop = self.run.stop = trainer.StopSignals()
        self.state = trainer.TrainState()
        # Time spent inside the compiled step, so the line can say how much of a step is the
        # trainer's own host work around it (queue read, hand-over to the strategy, logging).
        self.step_seconds = 0.0
        compiled_step = self.run.train_step

        def timed_step(batch):
            start = time.perf_counter()
            loss = compiled_step(batch).numpy()
            self.step_seconds += time.perf_counter() - start
            return loss

        self.run.train_step = timed_step

    def run_steps(self, count):
        """``count`` steps exactly as trainer.Run.loop does them; returns (a Mark after each, the
        milliseconds per step outside the compiled step from the end of the first to the last)."""
        marks, inside = [], []
        for _ in range(count):
            self.run.train_one_step(self.state)
            marks.append(Mark.now(self.run.train_reader.worker_pids))
            inside.append(self.step_seconds)
        host_ms = ((marks[-1].wall - marks[0].wall) - (inside[-1] - inside[0])) * 1e3 / max(count - 1, 1)
        return marks, host_ms


@dataclasses.dataclass
class Mark:
    """Wall clock and CPU seconds used so far by this process and by the given reader workers."""
    wall: float
    cpu: float
    reader_cpu: float

    @classmethod
    def now(cls, worker_pids=()):
        times = os.times()
        return cls(time.perf_counter(), times.user + times.system, sum(map(_cpu_seconds, worker_pids)))


def _cpu_seconds(pid):
    """utime + stime of a running process (os.times only counts children already waited for)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_fit_timer():
    """A Keras callback whose ``marks`` list holds a Mark taken at the end of every training batch."""
    import keras

    class FitTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.marks = []

        def on_train_batch_end(self, batch, logs=None):
            self.marks.append(Mark.now())

    return FitTimer()


def build_fit_model():
    """The same network (the trainer's builder), loss and optimizer, compiled for model.fit."""
    import keras
    import tensorflow as tf

    import models

    model = models.build_model(MODEL, NUMBER_CLASSES, input_channels=1, base_filters=BASE_FILTERS)

    def loss(y_true, y_pred):
        return steps.per_image_loss(y_pred, tf.cast(y_true, tf.int32), "ce", NUMBER_CLASSES)

    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=loss, jit_compile=False)
    return model


def measure(marks):
    """(images/s, CPU ms per image of the process, of the readers) from the end of the first step
    to the end of the last one; the first step of a round absorbs fit's per-call iterator set-up
    and any reader refill."""
    first, last = marks[0], marks[-1]
    images = (len(marks) - 1) * BATCH
    return (images / (last.wall - first.wall), (last.cpu - first.cpu) / images * 1e3,
            (last.reader_cpu - first.reader_cpu) / images * 1e3)


def run(config):
    """Returns (trainer measure() + host ms per step, per round; fit measure() per round; reader
    wait s per round; data label)."""
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        database = pathlib.Path(tmp) / "train.lmdb"
        data_label = write_training_database(database)
        # The trainer prints progress and the reader starvation notices: keep them off the one line.
        with contextlib.redirect_stdout(io.StringIO()):
            loop = TrainerLoop(config, database, pathlib.Path(tmp) / "run")
            fit_model = build_fit_model()
            trainer_results, fit_results, waits = [], [], []
            with loop.stop, loop.run.train_reader as reader:
                # The same augmented batches, recorded once from the trainer's reader, feed model.fit.
                recorded = [reader.get_batch() for _ in range(1 + config.steps)]
                images = np.concatenate([b[0] for b in recorded])
                masks = np.concatenate([b[1] for b in recorded])
                # Warm-up: tracing, first allocations, reader queue filled.
                loop.run_steps(config.warmup)
                fit_model.fit(images[:config.warmup * BATCH], masks[:config.warmup * BATCH],
                              batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
                for _ in range(config.rounds):
                    waited = reader.starvation_seconds
                    marks, host_ms = loop.run_steps(1 + config.steps)
                    trainer_results.append(measure(marks) + (host_ms,))
                    waits.append(reader.starvation_seconds - waited)
                    timer = make_fit_timer()
                    fit_model.fit(images, masks, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                                  callbacks=[timer])
                    fit_results.append(measure(timer.marks))
            loop.run.outputs.close()
    return trainer_results, fit_results, waits, data_label


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round and side (default 15)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each side first (default 5)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--reader_count", type=int, default=1, help="ImageReader worker processes (default 1, "
                        "the trainer's default --reader_count)")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.rounds, args.reader_count) < 1:
        raise SystemExit("--steps, --warmup, --rounds and --reader_count must all be >= 1")
    config = BenchConfig(args.steps, args.warmup, args.rounds, args.reader_count)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = os.getloadavg()[0]
    trainer_results, fit_results, waits, data_label = run(config)
    load_after = os.getloadavg()[0]
    best_trainer, best_fit = max(r[0] for r in trainer_results), max(r[0] for r in fit_results)
    # Rounds run back to back, so a round's two rates saw about the same load: their ratio is less
    # noisy than the ratio of the best rates, and CPU ms per image hardly depends on the load at all.
    paired = np.median([t[0] / f[0] for t, f in zip(trainer_results, fit_results)])
    trainer_cpu, reader_cpu, host_ms = (np.median([r[i] for r in trainer_results]) for i in (1, 2, 3))
    step_ms = 1e3 * BATCH / np.median([r[0] for r in trainer_results])
    fit_cpu = np.median([r[1] for r in fit_results])
    print(f"train: trainer {best_trainer:.1f} img/s, model.fit {best_fit:.1f} img/s, ratio "
          f"{best_trainer / best_fit:.2f} (target >= 0.95) [CPU, unet f16, 128 px, batch 8, "
          f"{config.reader_count} reader process(es), {os.cpu_count()} cores; best of {config.rounds} "
          f"interleaved rounds x {config.steps} steps; median paired ratio {paired:.2f}; CPU ms/img "
          f"trainer {trainer_cpu:.0f} + readers {reader_cpu:.1f} vs fit {fit_cpu:.0f} "
          f"(fit/trainer {fit_cpu / (trainer_cpu + reader_cpu):.2f}); trainer host work outside the "
          f"compiled step {host_ms:.1f} of {step_ms:.0f} ms/step; reader wait {sum(waits):.1f} s; "
          f"{data_label}; load avg {load_before:.1f} -> {load_after:.1f}]")

if __name__ == "__main__":
    main()
