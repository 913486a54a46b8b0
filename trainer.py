"""The training loop shared by train_unet.py and train_segnet.py.

    build_parser(model) -> argparse flags     config_from_args(model, args) -> TrainConfig
    validate_config(config, train_meta, test_meta)   clear errors before any TensorFlow work
    train(config) -> summary dict              what tests call; main(model, argv) -> exit code

Distribution (devices, strategy, workers) lives in distribute.py; metrics in metrics.py. The outer
loop in ``_run`` reads top to bottom: train ``test_every_n_steps`` steps, run a full test pass, log
(stdout, CSVs, plots, TensorBoard), checkpoint (latest, and best by test loss), decide on early
stopping. Output folder layout: see ``Outputs``.
"""
import argparse
import csv
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
import distribute
import metrics
import records

EXIT_OK, EXIT_ERROR, EXIT_BAD_FLAGS, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
LOSSES = ("ce", "dice", "ce+dice")
CHECKPOINT_FILES = ("model.weights.h5", "optimizer.npz", "state.json", "config.json")


class ConfigError(ValueError):
    """A flag value or database that cannot be trained on; the message says which and why."""


class TrainingError(RuntimeError):
    """Training stopped on an error (non-finite loss, unusable checkpoint)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs, as plain values (see build_parser for meanings)."""
    model: str
    train_database: str
    test_database: str
    output_dir: str
    batch_size: int = 4
    number_classes: int = 2
    tile_size: int = 256
    learning_rate: float = 1e-4
    test_every_n_steps: int = None
    early_stopping: int = 10
    gradient_update_location: str = None
    restore_checkpoint_filepath: str = None
    reader_count: int = 1
    use_augmentation: bool = True
    balance_classes: bool = False
    seed: int = 0
    base_filters: int = 64
    batch_norm: bool = True
    max_epochs: int = None
    gpus: str = None
    cpu_towers: int = None
    mixed_precision: bool = False
    xla: bool = False
    loss: str = "ce"
    log_every_n_steps: int = 10
    augmentation: dict = dataclasses.field(default_factory=lambda: augment.AugmentationConfig().to_dict())


@dataclasses.dataclass
class TrainState:
    """What a checkpoint restores besides the weights (saved as state.json)."""
    step: int = 0
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    wall_time_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)  # test loss per epoch


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser(model_name):
    """The argparse parser of train_<model_name>.py."""
    parser = argparse.ArgumentParser(
        prog=f"train_{model_name}.py",
        description=f"Train a {model_name} segmentation network on LMDB databases made by build_lmdb.py.")
    add = parser.add_argument
    add("--train_database", required=True, help="LMDB folder of training records")
    add("--test_database", required=True, help="LMDB folder of test records (evaluated every epoch)")
    add("--output_dir", required=True, help="folder for config.json, CSVs, plots, tensorboard/, "
        "checkpoints/ and model.keras (created; resuming into it appends to the CSVs)")
    add("--batch_size", type=int, default=4, help="images per tower per step (default 4); the "
        "effective batch is batch_size x towers x workers")
    add("--number_classes", type=int, default=2, help="classes including background 0 (default 2)")
    add("--tile_size", type=int, default=256, help="training crop and test tile size in pixels "
        "(default 256; divisible by 16 for unet, 32 for segnet)")
    add("--learning_rate", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    add("--test_every_n_steps", type=int, default=None, help="gradient steps between test passes "
        "(one 'epoch'); default: one pass over the training database")
    add("--early_stopping", type=int, default=10, help="stop after this many epochs without a lower "
        "test loss (default 10)")
    add("--gradient_update_location", default=None, help="where tower gradients are summed: cpu, "
        "gpu:N or nccl (default gpu:0 with GPUs, else cpu)")
    add("--restore_checkpoint_filepath", default=None, help="resume from a checkpoint folder or an "
        "output folder (its checkpoints/latest); a checkpoint with another number_classes is used "
        "for transfer learning (all layers but 'logits')")
    add("--reader_count", type=int, default=1, help="reader processes per tower (default 1)")
    add("--use_augmentation", type=int, choices=(0, 1), default=1, help="augment training images (default 1)")
    add("--balance_classes", type=int, choices=(0, 1), default=0,
        help="sample training records so every class is equally represented (default 0)")
    add("--seed", type=int, default=0, help="seed for weights and sampling (default 0)")
    add("--base_filters", type=int, default=64, help="feature depth of the first level (default 64)")
    add("--batch_norm", type=int, choices=(0, 1), default=1, help="batch normalisation after each "
        "convolution (default 1)")
    add("--max_epochs", type=int, default=None, help="stop after this many test passes (default: "
        "only early stopping)")
    add("--gpus", default=None, help="GPUs to train on: 'all' (default), 'none' or indices like '0,1'")
    add("--cpu_towers", type=int, default=None, help="train on the CPU split into N logical devices, "
        "one tower each (ignores GPUs)")
    add("--mixed_precision", action="store_true", help="float16 compute with dynamic loss scaling")
    add("--xla", action="store_true", help="compile the replica step with XLA (not for segnet)")
    add("--loss", choices=LOSSES, default="ce", help="cross-entropy, soft Dice over the foreground "
        "classes, or their sum (default ce)")
    add("--log_every_n_steps", type=int, default=10, help="print one progress line every N steps (default 10)")
    augment.add_augmentation_arguments(parser)
    return parser


def config_from_args(model_name, args):
    """TrainConfig from parsed arguments (the augmentation flags resolved by augment.py)."""
    try:
        augmentation = augment.augmentation_config_from_args(args)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from None
    return TrainConfig(
        model=model_name, train_database=args.train_database, test_database=args.test_database,
        output_dir=args.output_dir, batch_size=args.batch_size, number_classes=args.number_classes,
        tile_size=args.tile_size, learning_rate=args.learning_rate,
        test_every_n_steps=args.test_every_n_steps, early_stopping=args.early_stopping,
        gradient_update_location=args.gradient_update_location,
        restore_checkpoint_filepath=args.restore_checkpoint_filepath, reader_count=args.reader_count,
        use_augmentation=bool(args.use_augmentation), balance_classes=bool(args.balance_classes),
        seed=args.seed, base_filters=args.base_filters, batch_norm=bool(args.batch_norm),
        max_epochs=args.max_epochs, gpus=args.gpus, cpu_towers=args.cpu_towers,
        mixed_precision=args.mixed_precision, xla=args.xla, loss=args.loss,
        log_every_n_steps=args.log_every_n_steps, augmentation=augmentation.to_dict())


def read_database_metadata(path, role):
    """Metadata of the --<role>_database, or ConfigError naming the path."""
    try:
        return records.read_metadata(path)
    except (FileNotFoundError, records.RecordFormatError) as error:
        raise ConfigError(f"--{role}_database {path}: {error}") from None


def validate_config(config, train_metadata, test_metadata):
    """Raise ConfigError with a clear message for any value training cannot use."""
    import models

    if config.model not in models.MODEL_NAMES:
        raise ConfigError(f"model {config.model!r}: expected one of {', '.join(models.MODEL_NAMES)}")
    positive = {"batch_size": 1, "number_classes": 2, "early_stopping": 1, "reader_count": 1,
                "base_filters": 1, "log_every_n_steps": 1, "test_every_n_steps": 1, "max_epochs": 1,
                "cpu_towers": 1, "tile_size": 1}
    for name, minimum in positive.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} {value}: expected an integer >= {minimum}")
    if not (config.learning_rate >= 0 and math.isfinite(config.learning_rate)):
        raise ConfigError(f"--learning_rate {config.learning_rate}: expected a finite number >= 0")
    if config.loss not in LOSSES:
        raise ConfigError(f"--loss {config.loss!r}: expected one of {', '.join(LOSSES)}")
    try:
        models.check_input_size(config.model, config.tile_size, config.tile_size)
    except ValueError as error:
        raise ConfigError(f"--tile_size {config.tile_size}: {error}") from None
    for role, metadata, path in (("train", train_metadata, config.train_database),
                                 ("test", test_metadata, config.test_database)):
        if not metadata.get("num_records"):
            raise ConfigError(f"--{role}_database {path}: the database holds no records")
        found = [k for k, n in enumerate(metadata.get("class_pixel_counts", [])) if n > 0]
        if found and max(found) >= config.number_classes:
            raise ConfigError(
                f"--number_classes {config.number_classes} is too small for --{role}_database {path}: "
                f"it holds labels {found}; use --number_classes {max(found) + 1} or more")
        smallest = min(min(shape[0], shape[1]) for shape in metadata["image_shapes"])
        if smallest < config.tile_size:
            raise ConfigError(
                f"--{role}_database {path} holds images as small as {smallest} px, smaller than "
                f"--tile_size {config.tile_size}; use a tile size <= {smallest}")
    if train_metadata["channels"] != test_metadata["channels"]:
        raise ConfigError(
            f"the training database has {train_metadata['channels']} channel(s), the test database "
            f"{test_metadata['channels']}: they must match")


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


# ----------------------------------------------------------------------------------------------
# Losses and the distributed steps
# ----------------------------------------------------------------------------------------------

def dice_loss_from_sums(intersection, prob_sum, label_sum, smooth=1.0):
    """1 - mean soft Dice over the foreground classes (1..K-1) from per-class sums [..., K]."""
    import tensorflow as tf

    dice = (2.0 * intersection + smooth) / (prob_sum + label_sum + smooth)
    return 1.0 - tf.reduce_mean(dice[..., 1:], axis=-1)


def per_image_loss(logits, masks, loss_name, number_classes):
    """Loss of each image, averaged over its valid pixels (label -1 = ignore).

    Args:
      logits: float32 [B, H, W, K]; masks: int32 [B, H, W].
    Returns:
      float32 [B].
    """
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    valid = tf.cast(masks >= 0, tf.float32)
    labels = tf.maximum(masks, 0)
    terms = []
    if loss_name in ("ce", "ce+dice"):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        # An all-ignored image (test padding) contributes 0, not 0/0.
        terms.append(tf.reduce_sum(ce * valid, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0))
    if loss_name in ("dice", "ce+dice"):
        probs = tf.nn.softmax(logits) * valid[..., None]
        onehot = tf.one_hot(labels, number_classes) * valid[..., None]
        terms.append(dice_loss_from_sums(tf.reduce_sum(probs * onehot, axis=[1, 2]),
                                         tf.reduce_sum(probs, axis=[1, 2]), tf.reduce_sum(onehot, axis=[1, 2])))
    return tf.add_n(terms)


def make_train_step(strategy, model, optimizer, loss_name, number_classes, global_batch_size,
                    jit_compile=False):
    """A tf.function running one optimizer step on a distributed (images, masks) batch.

    Returns:
      step(distributed_batch) -> scalar loss: the mean over all images of all towers and workers.
    """
    import tensorflow as tf

    def loss_and_gradients(images, masks):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            # Divide by the GLOBAL batch exactly once. The all-reduce then *sums* the replicas'
            # gradients, which gives the gradient of the mean over every image of every tower.
            # Keras 3 losses already scale by 1/num_replicas inside a strategy, so they are not
            # used here: combining them with this division would shrink the loss twice.
            loss = tf.nn.compute_average_loss(
                per_image_loss(logits, masks, loss_name, number_classes), global_batch_size=global_batch_size)
            scaled_loss = optimizer.scale_loss(loss)  # identity unless --mixed_precision
        return loss, tape.gradient(scaled_loss, model.trainable_variables)

    if jit_compile:
        # Compile the forward and backward pass only. The cross-tower gradient sum and the update
        # stay outside XLA, so they still run on the --gradient_update_location device (an
        # all-reduce inside XLA would bypass it) and towers on logical CPU devices keep working.
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

    def replica_step(images, masks):
        loss, gradients = loss_and_gradients(images, masks)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    @tf.function
    def step(distributed_batch):
        per_replica_loss = strategy.run(replica_step, args=distributed_batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    return step


def make_test_step(strategy, model, number_classes):
    """A tf.function returning, per replica, additive sums over the valid pixels of a batch:
    ce_sum, pixels, intersection/prob_sum/label_sum [K] (soft Dice) and confusion [K, K]."""
    import tensorflow as tf

    def replica_step(images, masks):
        logits = tf.cast(model(images, training=False), tf.float32)
        valid = masks >= 0
        validf = tf.cast(valid, tf.float32)
        labels = tf.maximum(masks, 0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        probs = tf.nn.softmax(logits) * validf[..., None]
        onehot = tf.one_hot(labels, number_classes) * validf[..., None]
        confusion = tf.math.confusion_matrix(
            tf.boolean_mask(labels, valid), tf.boolean_mask(tf.argmax(logits, axis=-1, output_type=tf.int32), valid),
            num_classes=number_classes, dtype=tf.int64)
        return {"ce_sum": tf.reduce_sum(tf.cast(ce * validf, tf.float64)),
                "pixels": tf.reduce_sum(tf.cast(valid, tf.int64)),
                "intersection": tf.reduce_sum(tf.cast(probs * onehot, tf.float64), axis=[0, 1, 2]),
                "prob_sum": tf.reduce_sum(tf.cast(probs, tf.float64), axis=[0, 1, 2]),
                "label_sum": tf.reduce_sum(tf.cast(onehot, tf.float64), axis=[0, 1, 2]),
                "confusion": confusion}

    @tf.function
    def step(distributed_batch):
        return strategy.run(replica_step, args=distributed_batch)

    return step


def make_sync_statistics(strategy, model):
    """A function averaging the model's non-trainable variables (BatchNormalization moving
    statistics) over every replica of every worker, or None when there is nothing to average.

    Keras 3 keeps one copy of each moving statistic per replica, each updated from its own tower's
    batches only, and saves replica 0's. Averaging them before every test pass and checkpoint makes
    all replicas evaluate, and every file hold, the same model, using the statistics of all towers.
    """
    import tensorflow as tf

    variables = list(model.non_trainable_variables)
    if not variables or strategy.num_replicas_in_sync == 1:
        return None

    def replica_fn():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])
        for variable, mean in zip(variables, means):
            variable.assign(mean)

    @tf.function
    def sync():
        strategy.run(replica_fn)

    return sync


def distribute_batches(strategy, batches):
    """Feed one whole (images, masks) numpy batch to each local replica."""
    import tensorflow as tf

    def value_fn(context):
        # replica_id_in_sync_group counts replicas over all workers; this worker's are consecutive.
        images, masks = batches[context.replica_id_in_sync_group % len(batches)]
        return tf.constant(images, tf.float32), tf.constant(masks, tf.int32)

    return strategy.experimental_distribute_values_from_function(value_fn)


def sum_across_workers(strategy, vector):
    """Element-wise sum of a float64 numpy vector over all workers (one collective call)."""
    import tensorflow as tf

    if distribute.cluster_info(strategy).num_workers == 1:
        return np.asarray(vector, dtype=np.float64)
    local_replicas = distribute.local_replica_count(strategy)

    def value_fn(context):
        is_first_local = context.replica_id_in_sync_group % local_replicas == 0
        return tf.constant(vector if is_first_local else np.zeros_like(vector), tf.float64)

    values = strategy.experimental_distribute_values_from_function(value_fn)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def make_optimizer(config):
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_model(config, input_channels):
    """The network described by ``config`` (any input H, W divisible by the model's divisor)."""
    import models

    return models.build_model(config.model, config.number_classes, input_channels=input_channels,
                              base_filters=config.base_filters, batch_norm=config.batch_norm)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def save_checkpoint(directory, model, optimizer, state, config_dict):
    """Write a checkpoint folder atomically: build it beside ``directory``, then swap it in.

    The previous checkpoint is renamed to ``.<name>.old`` only once the new one is complete and
    removed after the swap, so a kill at any moment leaves a complete checkpoint (``find_checkpoint``
    falls back to ``.old`` if the kill came between the two renames).
    """
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    model.save_weights(os.path.join(temporary, "model.weights.h5"))
    np.savez(os.path.join(temporary, "optimizer.npz"),
             *[np.asarray(v.numpy()) for v in optimizer.variables])
    state_dict = dataclasses.asdict(state)
    if not math.isfinite(state.best_loss):  # no test pass yet; keep state.json strict JSON
        state_dict["best_loss"] = None
    _write_json(os.path.join(temporary, "state.json"), state_dict)
    _write_json(os.path.join(temporary, "config.json"), config_dict)
    old = os.path.join(parent, f".{name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(temporary, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """The checkpoint folder meant by --restore_checkpoint_filepath (a checkpoint or output folder)."""
    candidates = [path, os.path.join(path, "checkpoints", "latest"),
                  os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.old"),
                  os.path.join(path, "checkpoints", ".latest.old")]
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, f)) for f in CHECKPOINT_FILES):
            return candidate
    raise ConfigError(
        f"--restore_checkpoint_filepath {path}: no checkpoint there; expected a folder holding "
        f"{', '.join(CHECKPOINT_FILES)} or an output folder with checkpoints/latest")


def restore_checkpoint(directory, model, optimizer, config, input_channels):
    """Restore a checkpoint into ``model``/``optimizer``.

    Same number_classes: resume (weights, optimizer state, TrainState). Different number_classes:
    transfer learning (every layer but 'logits', fresh optimizer, fresh TrainState).
    Returns:
      (TrainState, resumed: bool)
    """
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    if saved.get("model") != config.model:
        raise ConfigError(f"--restore_checkpoint_filepath {directory} holds a {saved.get('model')} model, "
                          f"not {config.model}")
    wanted = {"base_filters": config.base_filters, "batch_norm": config.batch_norm, "input_channels": input_channels}
    mismatched = {k: saved.get(k) for k, v in wanted.items() if saved.get(k) != v}
    if mismatched:
        raise ConfigError(
            f"--restore_checkpoint_filepath {directory} was trained with "
            + ", ".join(f"{k}={v}" for k, v in mismatched.items()) + "; the same values are needed to restore it")
    weights = os.path.join(directory, "model.weights.h5")
    if saved["number_classes"] == config.number_classes:
        model.load_weights(weights)
        values = np.load(os.path.join(directory, "optimizer.npz"))
        arrays = [values[f"arr_{i}"] for i in range(len(values.files))]
        variables = optimizer.variables
        if len(arrays) != len(variables) or any(a.shape != tuple(v.shape) for a, v in zip(arrays, variables)):
            raise TrainingError(f"{directory}/optimizer.npz does not match this optimizer "
                                f"({len(arrays)} arrays for {len(variables)} variables); was "
                                "--mixed_precision changed? Resume with the original flags")
        for variable, array in zip(variables, arrays):
            variable.assign(array)
        # The restored state includes the old learning rate; the flag of this run wins.
        optimizer.learning_rate = config.learning_rate
        with open(os.path.join(directory, "state.json")) as f:
            state = TrainState(**json.load(f))
        state.best_loss = math.inf if state.best_loss is None else state.best_loss
        print(f"resumed from {directory}: step {state.step}, epoch {state.epoch}, "
              f"best test loss {state.best_loss:.4g}", flush=True)
        return state, True
    source = build_model(dataclasses.replace(config, number_classes=saved["number_classes"]), input_channels)
    source.load_weights(weights)
    restored, skipped = [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            source_layer = None
        source_weights = source_layer.get_weights() if source_layer is not None else None
        if (layer.name == "logits" or source_weights is None
                or [w.shape for w in source_weights] != [tuple(w.shape) for w in layer.weights]):
            skipped.append(layer.name)
            continue
        layer.set_weights(source_weights)
        restored.append(layer.name)
    print(f"transfer learning from {directory} ({saved['number_classes']} -> {config.number_classes} "
          f"classes): restored {len(restored)} layers; not restored (fresh weights): {', '.join(skipped)}; "
          "optimizer, step and early-stopping history start fresh", flush=True)
    return TrainState(), False


# ----------------------------------------------------------------------------------------------
# Outputs: CSVs, plots, TensorBoard (chief only)
# ----------------------------------------------------------------------------------------------

class Outputs:
    """The output folder. Only the chief writes; on other workers every method does nothing.

    Layout: config.json, train_loss.csv, test_metrics.csv, plots/{loss,metrics}.png,
    tensorboard/, checkpoints/{latest,best}/, model.keras.
    """
    TRAIN_COLUMNS = ["step", "loss", "step_time_s", "images_per_s"]

    def __init__(self, output_dir, number_classes, enabled, resume_state=None):
        self.dir = output_dir
        self.enabled = enabled
        self.test_columns = (["epoch", "step", "loss", "pixel_accuracy"]
                             + [f"iou_{k}" for k in range(number_classes)]
                             + [f"dice_{k}" for k in range(number_classes)]
                             + ["mean_iou", "starvation_s", "wall_time_s"])
        self.train_csv = os.path.join(output_dir, "train_loss.csv")
        self.test_csv = os.path.join(output_dir, "test_metrics.csv")
        self._train_file = self._writer = None
        if not enabled:
            return
        os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
        # Resuming continues the CSVs; rows past the restored step (written after the checkpoint
        # by a run that then died) are dropped so the files describe exactly one history.
        keep_step = resume_state.step if resume_state else 0
        keep_epoch = resume_state.epoch if resume_state else 0
        _truncate_csv(self.train_csv, self.TRAIN_COLUMNS, lambda row: int(row["step"]) <= keep_step)
        _truncate_csv(self.test_csv, self.test_columns, lambda row: int(row["epoch"]) <= keep_epoch)
        self._train_file = open(self.train_csv, "a", newline="")
        self._train_rows = csv.writer(self._train_file)
        import tensorflow as tf
        self._writer = tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard"))

    def log_step(self, step, loss, step_time, images_per_s):
        if self.enabled:
            self._train_rows.writerow([step, f"{loss:.6g}", f"{step_time:.4f}", f"{images_per_s:.2f}"])

    def log_scalars(self, step, scalars):
        if self.enabled:
            with self._writer.as_default(step=step):
                for name, value in scalars.items():
                    _summary_scalar(name, value)

    def log_test(self, row, examples, number_classes):
        """Append one test_metrics.csv row, write TensorBoard scalars and images (``examples`` =
        (images, true masks, predicted masks) or None), redraw the plots."""
        if not self.enabled:
            return
        with open(self.test_csv, "a", newline="") as f:
            csv.DictWriter(f, self.test_columns).writerow({k: _format(row[k]) for k in self.test_columns})
        self._train_file.flush()
        with self._writer.as_default(step=row["step"]):
            for name in self.test_columns[2:]:
                _summary_scalar(f"test/{name}", row[name])
            if examples is not None:
                images, true_masks, predicted_masks = examples
                channel = images[..., :3] if images.shape[-1] == 3 else images[..., :1]
                low, high = channel.min(), channel.max()
                _summary_images("test/image", (channel - low) / max(high - low, 1e-6))
                scale = 1.0 / max(number_classes - 1, 1)
                _summary_images("test/true_mask", np.clip(true_masks, 0, None)[..., None] * scale)
                _summary_images("test/predicted_mask", predicted_masks[..., None] * scale)
        self._writer.flush()
        self.plot()

    def plot(self):
        """plots/loss.png (train and test loss by step) and plots/metrics.png (test metrics by epoch)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train_rows, test_rows = _read_csv(self.train_csv), _read_csv(self.test_csv)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([int(r["step"]) for r in train_rows], [float(r["loss"]) for r in train_rows],
                lw=0.8, label="train")
        ax.plot([int(r["step"]) for r in test_rows], [float(r["loss"]) for r in test_rows], "o-", label="test")
        ax.set(xlabel="step", ylabel="loss", yscale="log" if train_rows and min(
            float(r["loss"]) for r in train_rows) > 0 else "linear")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.dir, "plots", "loss.png"), dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        epochs = [int(r["epoch"]) for r in test_rows]
        for name in ["pixel_accuracy", "mean_iou"] + [c for c in self.test_columns if c.startswith("dice_")]:
            ax.plot(epochs, [float(r[name]) for r in test_rows], "o-", label=name)
        ax.set(xlabel="epoch", ylabel="test metric", ylim=(0, 1.02))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.path.join(self.dir, "plots", "metrics.png"), dpi=100)
        plt.close(fig)

    def close(self):
        if self._train_file is not None:
            self._train_file.close()
            self._writer.close()
            self._train_file = None


# tf.summary.scalar/image need the separate tensorboard package; these write the same records
# (the TensorBoard "scalars" and "images" plugin formats) with TensorFlow's core summary op.
def _summary_scalar(tag, value):
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)


def _summary_images(tag, images):
    """images: float [N, H, W, 1 or 3] in [0, 1]."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "images"
    pixels = tf.cast(tf.round(tf.clip_by_value(tf.constant(images, tf.float32), 0, 1) * 255), tf.uint8)
    encoded = [tf.io.encode_png(image) for image in pixels]
    height, width = images.shape[1:3]
    tf.summary.write(tag, tf.stack([tf.constant(str(width)), tf.constant(str(height))] + encoded),
                     metadata=metadata)


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _truncate_csv(path, columns, keep):
    """Rewrite ``path`` with a header and only the rows ``keep`` accepts (create it if missing)."""
    rows = [row for row in _read_csv(path) if keep(row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------

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

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# ----------------------------------------------------------------------------------------------
# Training
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
    train_metadata = read_database_metadata(config.train_database, "train")
    test_metadata = read_database_metadata(config.test_database, "test")
    validate_config(config, train_metadata, test_metadata)
    checkpoint_dir = find_checkpoint(config.restore_checkpoint_filepath) if config.restore_checkpoint_filepath else None

    # Devices and strategy come before any other TensorFlow work (see distribute.py).
    cluster = distribute.detect_cluster(os.environ)
    towers = distribute.configure_devices(config.cpu_towers, config.gpus)
    reduce_to = distribute.parse_reduction_location(
        config.gradient_update_location, len(towers) if towers[0].startswith("/gpu") else 0)
    distribute.check_xla(config.xla, config.model)
    strategy = distribute.build_strategy(towers, reduce_to, cluster)
    info = distribute.cluster_info(strategy)

    import keras
    keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision else "float32")
    keras.utils.set_random_seed(config.seed)
    input_channels = train_metadata["channels"]
    global_batch = config.batch_size * len(towers) * info.num_workers
    steps_per_epoch = config.test_every_n_steps or max(1, math.ceil(train_metadata["num_records"] / global_batch))
    config_dict = dict(dataclasses.asdict(config), input_channels=input_channels, effective_batch=global_batch,
                       towers=towers, num_workers=info.num_workers, reduction=reduce_to,
                       steps_per_epoch=steps_per_epoch, tool_version=records.TOOL_VERSION)
    if info.is_chief:
        os.makedirs(config.output_dir, exist_ok=True)
        _write_json(os.path.join(config.output_dir, "config.json"), config_dict)
        print("configuration:\n" + json.dumps(config_dict, indent=2, sort_keys=True, default=str), flush=True)
        print(distribute.describe(strategy, towers, reduce_to, info), flush=True)
        if distribute.env_summary():
            print(f"environment: {distribute.env_summary()}", flush=True)
        print(f"effective batch: {config.batch_size} per tower x {len(towers)} tower(s) x "
              f"{info.num_workers} worker(s) = {global_batch}", flush=True)

    with strategy.scope():
        model = build_model(config, input_channels)
        optimizer = make_optimizer(config)
        optimizer.build(model.trainable_variables)
    state, resumed = TrainState(), False
    if checkpoint_dir:
        state, resumed = restore_checkpoint(checkpoint_dir, model, optimizer, config, input_channels)
    if resumed and info.is_chief and os.path.abspath(config.output_dir) != _output_dir_of(checkpoint_dir):
        _copy_history(_output_dir_of(checkpoint_dir), config.output_dir)

    train_step = make_train_step(strategy, model, optimizer, config.loss, config.number_classes,
                                 global_batch, jit_compile=config.xla)
    test_step = make_test_step(strategy, model, config.number_classes)
    sync_statistics = make_sync_statistics(strategy, model)
    train_reader, test_reader = _make_readers(config, len(towers), info, state.step)
    outputs = Outputs(config.output_dir, config.number_classes, info.is_chief, state if resumed else None)
    context = _RunContext(config, config_dict, strategy, info, model, optimizer, train_step, test_step,
                          train_reader, test_reader, outputs, steps_per_epoch, global_batch, sync_statistics)
    try:
        with StopSignals() as stop, train_reader, test_reader:
            stop_reason = _run(context, state, stop)
    finally:
        outputs.close()
    exit_code = {"sigterm": EXIT_SIGTERM, "sigint": EXIT_SIGINT}.get(stop_reason, EXIT_OK)
    model_path = None
    if exit_code == EXIT_OK and info.is_chief:
        model_path = export_best_model(config, input_channels)
    if info.is_chief:
        _print_locations(config.output_dir, stop_reason, state, model_path)
    return {"exit_code": exit_code, "stop_reason": stop_reason, "step": state.step, "epoch": state.epoch,
            "best_loss": state.best_loss, "best_epoch": state.best_epoch, "history": list(state.history),
            "effective_batch": global_batch, "output_dir": config.output_dir, "model_path": model_path,
            "is_chief": info.is_chief, "num_workers": info.num_workers, "towers": towers}


@dataclasses.dataclass
class _RunContext:
    config: TrainConfig
    config_dict: dict
    strategy: object
    info: distribute.ClusterInfo
    model: object
    optimizer: object
    train_step: object
    test_step: object
    train_reader: object
    test_reader: object
    outputs: Outputs
    steps_per_epoch: int
    global_batch: int
    sync_statistics: object = None  # make_sync_statistics(...) or None


def _run(c, state, stop):
    """The outer loop: train an epoch, test, log, checkpoint, decide. Returns the stop reason."""
    config, local = c.config, distribute.local_replica_count(c.strategy)
    run_start, wall_before = time.perf_counter(), state.wall_time_s
    starvation_mark = c.train_reader.starvation_seconds
    last_checkpoint = state.step if state.step else None  # a resumed run starts from one
    while True:
        # ---- train up to the next multiple of steps_per_epoch: a run resumed from a mid-epoch
        # (SIGTERM) checkpoint finishes that epoch, so test passes stay at the same steps
        epoch_end = (state.step // c.steps_per_epoch + 1) * c.steps_per_epoch
        while state.step < epoch_end:
            if _stop_requested(c, stop):
                break
            step_start = time.perf_counter()
            batches = _next_batches(c.train_reader, local, stop)
            if batches is None:
                break
            loss = float(c.train_step(distribute_batches(c.strategy, batches)))
            _check_finite(loss, state.step + 1, last_checkpoint, config.output_dir)
            state.step += 1
            _log_step(c, state.step, loss, time.perf_counter() - step_start)
        state.wall_time_s = wall_before + time.perf_counter() - run_start
        if c.sync_statistics is not None:
            c.sync_statistics()
        if stop.requested:
            _checkpoint(c, state, best=False)
            return "sigterm" if stop.signal_number == signal.SIGTERM else "sigint"

        # ---- test pass, logging, checkpoints, early stopping
        test_start = time.perf_counter()
        row, examples = run_test_pass(c.strategy, c.test_step, c.test_reader, c.model, config, local)
        state.epoch += 1
        state.history.append(row["loss"])
        improved = row["loss"] < state.best_loss
        if improved:
            state.best_loss, state.best_epoch, state.epochs_without_improvement = row["loss"], state.epoch, 0
        else:
            state.epochs_without_improvement += 1
        starvation = c.train_reader.starvation_seconds
        row.update(epoch=state.epoch, step=state.step, starvation_s=starvation - starvation_mark,
                   wall_time_s=state.wall_time_s)
        starvation_mark = starvation
        c.outputs.log_test(row, examples, config.number_classes)
        _print_test_line(c, state, row, improved, time.perf_counter() - test_start)
        _checkpoint(c, state, best=improved)
        last_checkpoint = state.step
        if state.epochs_without_improvement >= config.early_stopping:
            return "early_stopping"
        if config.max_epochs and state.epoch >= config.max_epochs:
            return "max_epochs"


def _next_batches(reader, count, stop):
    """``count`` training batches, or None when the readers died from the stop signal (they share
    the trainer's process group, so Ctrl-C reaches them too)."""
    try:
        return [reader.get_batch() for _ in range(count)]
    except _reader_error_types():
        if stop.requested:
            return None
        raise


def _check_finite(loss, step, last_checkpoint, output_dir):
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is {os.path.join(output_dir, 'checkpoints', 'latest')} "
                f"(step {last_checkpoint})" if last_checkpoint is not None else "no checkpoint was written yet")
        raise TrainingError(f"the training loss became {loss} at step {step}; stopping: {kept}. "
                            "Try a lower --learning_rate or another --loss")


def _log_step(c, step, loss, step_time):
    """train_loss.csv every step; a printed line and TensorBoard scalars every log_every_n_steps."""
    images_per_s = c.global_batch / step_time
    c.outputs.log_step(step, loss, step_time, images_per_s)
    if step % c.config.log_every_n_steps == 0 and c.info.is_chief:
        print(f"step {step:7d}  loss {loss:.4f}  step {step_time:.3f}s  {images_per_s:7.1f} img/s  "
              f"queue {c.train_reader.get_queue_size()}", flush=True)
        c.outputs.log_scalars(step, {"train/loss": loss, "train/images_per_s": images_per_s})


def _print_test_line(c, state, row, improved, seconds):
    if c.info.is_chief:
        dice = " ".join("%.3f" % row[f"dice_{k}"] for k in range(c.config.number_classes))
        verdict = "(best)" if improved else f"({state.epochs_without_improvement} without improvement)"
        print(f"epoch {state.epoch:4d}  step {state.step:7d}  test loss {row['loss']:.4f}  "
              f"accuracy {row['pixel_accuracy']:.4f}  mean IoU {row['mean_iou']:.4f}  dice {dice}  "
              f"{verdict}  test {seconds:.1f}s", flush=True)


def _stop_requested(c, stop):
    """Whether to stop now; with several workers, true as soon as any worker got a signal, so all
    of them stop at the same step instead of waiting in a collective for the missing one."""
    if c.info.num_workers == 1:
        return stop.requested
    votes = sum_across_workers(c.strategy, np.array([1.0 if stop.requested else 0.0]))
    if votes[0] > 0 and not stop.requested:
        stop.signal_number = signal.SIGTERM
    return votes[0] > 0


def run_test_pass(strategy, test_step, test_reader, model, config, local_replicas):
    """Evaluate every test pixel exactly once.

    Batches are fed ``local_replicas`` at a time; the last group is padded with all-ignored
    batches. Workers may hold different numbers of test batches, which is fine because the test
    step runs no collective; the sums are added across workers once at the end.
    Returns:
      (metrics row dict with loss, pixel_accuracy, iou_k, dice_k, mean_iou;
       (images, true masks, predicted masks) of up to 3 test tiles for TensorBoard).
    """
    k = config.number_classes
    totals = {"ce_sum": np.zeros(1), "pixels": np.zeros(1), "intersection": np.zeros(k),
              "prob_sum": np.zeros(k), "label_sum": np.zeros(k), "confusion": np.zeros((k, k))}
    examples = None
    finished = False
    while not finished:
        group = []
        while len(group) < local_replicas:
            batch = test_reader.get_batch()
            if batch is None:
                finished = True
                break
            group.append(batch)
        if not group:
            break
        if examples is None:
            examples = group[0]
        padding = (np.zeros_like(group[0][0]), np.full_like(group[0][1], -1))
        group += [padding] * (local_replicas - len(group))
        sums = test_step(distribute_batches(strategy, group))
        for name in totals:
            totals[name] += sum(np.asarray(v.numpy(), dtype=np.float64).reshape(totals[name].shape)
                                for v in strategy.experimental_local_results(sums[name]))
    flat = sum_across_workers(strategy, np.concatenate([v.ravel() for v in totals.values()]))
    offset = 0
    for name in totals:
        size = totals[name].size
        totals[name] = flat[offset:offset + size].reshape(totals[name].shape)
        offset += size
    loss = 0.0
    if config.loss in ("ce", "ce+dice"):
        loss += float(totals["ce_sum"][0] / max(totals["pixels"][0], 1))
    if config.loss in ("dice", "ce+dice"):
        loss += float(dice_loss_from_sums(totals["intersection"], totals["prob_sum"], totals["label_sum"]))
    row = {"loss": loss, **metrics.summarize(totals["confusion"].astype(np.int64))}
    if examples is None:  # this worker's shard of the test set is empty
        return row, None
    images, true_masks = examples[0][:3], examples[1][:3]
    predicted = np.argmax(np.asarray(model(images, training=False)), axis=-1)
    return row, (images, true_masks, predicted)


def _checkpoint(c, state, best):
    """checkpoints/latest (and checkpoints/best). Non-chief workers write to a temporary folder
    and delete it: every worker must take part in saving distributed variables, only one keeps it."""
    if c.info.is_chief:
        root = os.path.join(c.config.output_dir, "checkpoints")
        save_checkpoint(os.path.join(root, "latest"), c.model, c.optimizer, state, c.config_dict)
        if best:
            save_checkpoint(os.path.join(root, "best"), c.model, c.optimizer, state, c.config_dict)
    else:
        scratch = tempfile.mkdtemp(prefix=f"checkpoint-worker{c.info.worker_index}-")
        try:
            save_checkpoint(os.path.join(scratch, "latest"), c.model, c.optimizer, state, c.config_dict)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _make_readers(config, towers, info, start_step):
    """The training and test ImageReaders of this worker (not started)."""
    import imagereader

    augmentation = augment.AugmentationConfig(**config.augmentation)
    # A resumed run draws a new sampling stream instead of replaying the batches already seen.
    seed = config.seed + 7919 * start_step
    common = dict(num_workers=config.reader_count * towers, tile_size=config.tile_size,
                  shard_index=info.worker_index, shard_count=info.num_workers)
    try:
        train_reader = imagereader.ImageReader(
            config.train_database, config.batch_size, use_augmentation=config.use_augmentation,
            balance_classes=config.balance_classes, shuffle=True, augmentation=augmentation, seed=seed, **common)
        test_reader = imagereader.ImageReader(
            config.test_database, config.batch_size, use_augmentation=False, shuffle=False, seed=config.seed, **common)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    return train_reader, test_reader


def export_best_model(config, input_channels):
    """Save the best checkpoint's weights as output_dir/model.keras (float32, loads without the
    training code after ``import models``). Returns its path."""
    import keras

    best = os.path.join(config.output_dir, "checkpoints", "best", "model.weights.h5")
    if not os.path.exists(best):
        best = os.path.join(config.output_dir, "checkpoints", "latest", "model.weights.h5")
    # Build outside the strategy and in float32 so the file holds plain variables that load
    # anywhere, whatever --mixed_precision and towers were used for training.
    keras.mixed_precision.set_global_policy("float32")
    model = build_model(config, input_channels)
    model.load_weights(best)
    path = os.path.join(config.output_dir, "model.keras")
    temporary = os.path.join(config.output_dir, ".model.tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)
    return path


def _output_dir_of(checkpoint_dir):
    """The output folder holding ``checkpoint_dir`` (…/checkpoints/<name>), or None."""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def _copy_history(source_dir, output_dir):
    """Resuming into a new output folder: start its CSVs from the old run's (truncated later)."""
    if source_dir is None:
        return
    os.makedirs(output_dir, exist_ok=True)
    for name in ("train_loss.csv", "test_metrics.csv"):
        if os.path.exists(os.path.join(source_dir, name)) and not os.path.exists(os.path.join(output_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(output_dir, name))


def _print_locations(output_dir, stop_reason, state, model_path):
    reasons = {"early_stopping": "early stopping", "max_epochs": "--max_epochs reached",
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
