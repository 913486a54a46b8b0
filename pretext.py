"""Self-supervised pretext tasks: what pretrain_unet.py trains a UNet on when there are no masks.

Blind-spot denoising (Noise2Void, Krull et al. 2019; the denoising half of DenoiSeg, Buchholz et al.
2020): in every training crop about ``mask_fraction`` of the pixels are replaced by the value of a
random neighbour in a (2 r + 1)^2 window (never the pixel itself), and the network predicts the
original values of those pixels from their surroundings. The loss is the mean squared error on the
replaced pixels only: the network cannot copy its input there, so it must learn what microscopy
structure looks like (edges, blobs, textures) to fill them in; pixel noise that is independent from
pixel to pixel cannot be predicted, so the best it can do is a denoised image. The output head is a
linear 1 x 1 convolution to the C input channels (the UNet's "logits" layer with C outputs); every
other layer is what train_unet.py --init_from transfers.

Masked-patch reconstruction (the masked-image pretext of MAE / BiaPy, on a convolutional network):
``mask_fraction`` of the ``patch_size`` x ``patch_size`` squares of a crop are set to 0 (the image
mean after normalisation) and the network restores them from the context; the loss is the mean
squared error on the masked squares only. It asks for larger context than the blind spot does.

    blind_spot(images, fraction, radius, seed) -> (inputs, weights)     blind-spot masking
    masked_patches(images, fraction, patch_size, seed) -> (inputs, weights)
    masked_mse(predictions, targets, weights) -> loss per image           the loss, masked pixels only
    PretextConfig                                                          the task's settings (config.json)
    PretextTask                                                            the trainer's hook (trainer.py)

The trainer (trainer.py) runs this task through the same loop, readers, towers, checkpoints, resume
and signals as segmentation training; the task object gives it the train step's loss, the test pass
and what a test line shows. Importing this module does not import TensorFlow.
"""
import dataclasses
import time

import numpy as np

import flags
import normalization
import predictor
import records
import steps

TASKS = ("blind_spot", "masked_patch")
# Noise2Void masks ~0.2-2 % of a patch per step; more masked pixels give more loss terms per step,
# but each one's neighbourhood then holds more replaced pixels. Masked-image modelling hides far
# more (MAE: 75 % of ViT patches); a convolutional network needs visible context around each
# square, so a quarter of them.
DEFAULT_MASK_FRACTION = {"blind_spot": 0.015, "masked_patch": 0.25}
DEFAULT_RADIUS = 2  # a 5 x 5 window, Noise2Void's default
DEFAULT_PATCH_SIZE = 8
DEFAULT_TEST_CROPS = 16
_TEST_SEED = 20261203  # the test pass masks the same pixels at every pass, so its losses compare
_TEST_BATCH = 4


@dataclasses.dataclass
class PretextConfig:
    """The pretext task's settings, saved in config.json under "pretext"; each field is also a flag of
    pretrain_unet.py (flags.py).

    task: one of TASKS. mask_fraction: share of the pixels (blind_spot) or squares (masked_patch) of a
    crop hidden and scored per step; None = the task's default. radius: blind_spot's neighbour lies
    within this many pixels. patch_size: masked_patch's square side. test_crops: crops (one per
    record, spread over the database) the test pass scores.
    """
    task: str = flags.flag("blind_spot: Noise2Void-style denoising, the masked pixels predicted from their "
                           "neighbours; masked_patch: hidden squares restored from their surroundings "
                           "(default %(default)s)", "blind_spot", choices=TASKS, name="pretext_task")
    mask_fraction: float = flags.flag("share of the pixels (blind_spot) or squares (masked_patch) of each crop "
                                      "hidden and scored (default: {mask_fractions})", kind=float)
    radius: int = flags.flag("blind_spot: a replaced pixel takes the value of a random pixel at most this far "
                             "away (default %(default)s: a 5 x 5 window)", DEFAULT_RADIUS, kind=int,
                             name="neighbour_radius")
    patch_size: int = flags.flag("masked_patch: side in pixels of the hidden squares (default %(default)s)",
                                 DEFAULT_PATCH_SIZE, kind=int)
    test_crops: int = flags.flag("crops of --tile_size, one per record spread over the database, that the test "
                                 "pass scores with fixed masked pixels (default %(default)s)", DEFAULT_TEST_CROPS,
                                 kind=int)

    def __post_init__(self):
        if self.mask_fraction is None and self.task in DEFAULT_MASK_FRACTION:
            self.mask_fraction = DEFAULT_MASK_FRACTION[self.task]

    def problems(self):
        """Messages naming the flag of every unusable value ([] when all are usable)."""
        found = []
        if self.task not in TASKS:
            found.append(f"--pretext_task {self.task!r}: expected one of {', '.join(TASKS)}")
        elif self.task == "blind_spot" and not 0.0 < self.mask_fraction <= 0.25:
            found.append(f"--mask_fraction {self.mask_fraction}: expected a share in (0, 0.25] for blind_spot "
                         "(Noise2Void uses 0.002 to 0.02); with more, the neighbours of a masked pixel are "
                         "masked too")
        elif self.task == "masked_patch" and not 0.0 < self.mask_fraction < 1.0:
            found.append(f"--mask_fraction {self.mask_fraction}: expected a share in (0, 1) for masked_patch")
        if not 1 <= self.radius <= 8:
            found.append(f"--neighbour_radius {self.radius}: expected 1 to 8 pixels")
        if not 1 <= self.patch_size <= 64:
            found.append(f"--patch_size {self.patch_size}: expected 1 to 64 pixels")
        if self.test_crops < 1:
            found.append(f"--test_crops {self.test_crops}: expected an integer >= 1")
        return found


def changed_settings(saved, current):
    """["--flag old -> new", ...]: the pretext settings (PretextConfig dicts) that differ between a
    checkpoint's run and this one."""
    return [f"--{flags.flag_name(field)} {saved.get(field.name)} -> {current.get(field.name)}"
            for field in flags.flag_fields(PretextConfig) if saved.get(field.name) != current.get(field.name)]


def add_arguments(parser):
    """The pretext flags of pretrain_unet.py: PretextConfig's fields."""
    flags.add_flags(parser.add_argument_group("pretext task"), PretextConfig,
                    mask_fractions=", ".join(f"{k} {v:g}" for k, v in DEFAULT_MASK_FRACTION.items()))


def config_from_args(args):
    return PretextConfig(**{field.name: getattr(args, flags.flag_name(field))
                            for field in flags.flag_fields(PretextConfig)})


# ----------------------------------------------------------------------------------------------
# The masking and the loss
# ----------------------------------------------------------------------------------------------

def blind_spot(images, fraction, radius=DEFAULT_RADIUS, seed=None):
    """Replace about ``fraction`` of the pixels of each image by a random neighbour's value.

    Args:
      images: float32 [B, H, W, C] (H, W > 2 * radius).
      fraction: probability that a pixel is replaced (independently per pixel).
      radius: the neighbour is at offset (dy, dx) != (0, 0) with |dy|, |dx| <= radius; an offset that
        leaves the image is mirrored (-dy, -dx), so the neighbour is never the pixel itself.
      seed: an int for a fixed draw (stateless; the test pass), None for a new draw per call.
    Returns:
      (inputs float32 [B, H, W, C]: ``images`` with the chosen pixels replaced, all channels together;
       weights float32 [B, H, W]: 1 at the replaced pixels, else 0).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    side = 2 * radius + 1

    def uniform(stream, **kwargs):
        if seed is None:
            return tf.random.uniform([b, h, w], **kwargs)
        return tf.random.stateless_uniform([b, h, w], seed=[seed, stream], **kwargs)

    chosen = uniform(0) < fraction
    # An index into the window without its centre.
    offset = uniform(1, minval=0, maxval=side * side - 1, dtype=tf.int32)
    offset += tf.cast(offset >= side * side // 2, tf.int32)
    dy, dx = offset // side - radius, offset % side - radius
    rows, cols = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
    y, x = rows + dy, cols + dx
    y = tf.where((y < 0) | (y >= h), rows - dy, y)
    x = tf.where((x < 0) | (x >= w), cols - dx, x)
    batch = tf.broadcast_to(tf.range(b)[:, None, None], [b, h, w])
    neighbours = tf.gather_nd(images, tf.stack([batch, y, x], axis=-1))
    inputs = tf.where(chosen[..., None], neighbours, images)
    return inputs, tf.cast(chosen, tf.float32)


def masked_patches(images, fraction, patch_size=DEFAULT_PATCH_SIZE, seed=None):
    """Set about ``fraction`` of the ``patch_size`` squares of each image (a grid from the top left
    corner; the last row and column may be cut by the border) to 0 in every channel.

    Args and Returns: as ``blind_spot`` (weights: 1 on the hidden squares).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    grid = [b, (h + patch_size - 1) // patch_size, (w + patch_size - 1) // patch_size]
    draw = tf.random.uniform(grid) if seed is None else tf.random.stateless_uniform(grid, seed=[seed, 2])
    hidden = tf.cast(draw < fraction, tf.float32)
    hidden = tf.repeat(tf.repeat(hidden, patch_size, axis=1), patch_size, axis=2)[:, :h, :w]
    return images * (1.0 - hidden[..., None]), hidden


def masked_mse(predictions, targets, weights):
    """Per-image mean over the weighted (masked) pixels of the channel-mean squared error: float32 [B].

    Pixels of weight 0 do not enter the loss at all; an image without a masked pixel has loss 0.
    """
    import tensorflow as tf

    error = tf.reduce_mean(tf.square(tf.cast(predictions, tf.float32) - tf.cast(targets, tf.float32)), axis=-1)
    return tf.reduce_sum(error * weights, axis=[1, 2]) / tf.maximum(tf.reduce_sum(weights, axis=[1, 2]), 1.0)


# ----------------------------------------------------------------------------------------------
# The trainer's hook
# ----------------------------------------------------------------------------------------------

class PretextTask:
    """A pretext task as the trainer's task (see trainer.SegmentationTask for the interface)."""

    test_columns = ["epoch", "step", "loss", "input_loss", "loss_ratio", "test_pixels", "scored_pixels",
                    "test_seconds", "starvation_s", "wall_time_s"]
    metric_curves = [("loss_ratio", "test loss / loss of the corrupted input itself")]

    def __init__(self, settings):
        self.settings = settings

    def corrupt(self, images, seed=None):
        """(inputs, weights) of ``images``: the hidden pixels and what the network sees instead."""
        settings = self.settings
        if settings.task == "masked_patch":
            return masked_patches(images, settings.mask_fraction, settings.patch_size, seed)
        return blind_spot(images, settings.mask_fraction, settings.radius, seed)

    def make_train_step(self, strategy, model, optimizer, config, global_batch):
        import tensorflow as tf

        def batch_loss(images, masks):
            inputs, weights = self.corrupt(images)
            # Pixels the reader marks as ignored (-1: outside the image after augmentation) are never scored.
            weights *= tf.cast(masks >= 0, tf.float32)
            return masked_mse(model(inputs, training=True), images, weights)

        return steps.make_step(strategy, model, optimizer, batch_loss, global_batch, jit_compile=config.xla)

    def make_evaluator(self, model, config, info):
        return PretextEvaluator(model, config.test_database, config.tile_size, self,
                                shard_index=info.worker_index, shard_count=info.num_workers)

    def progress_metric(self, row):
        """The test figure of the progress line: test loss over the corrupted input's own loss."""
        return f"test loss ratio {row['loss_ratio']:.3f}"

    def describe(self, row):
        return (f"test loss {row['loss']:.4f}  the input itself {row['input_loss']:.4f}  "
                f"ratio {row['loss_ratio']:.3f}")


class PretextEvaluator:
    """The pretext test pass: the masked-pixel loss of fixed crops with fixed hidden pixels.

    ``test_crops`` records spread over the database are centre-cropped to ``tile_size`` and normalised
    with their source image's statistics, once; the hidden pixels come from a fixed seed, so every
    pass scores the same pixels and the test losses of a run compare. ``input_loss`` is the loss of
    the identity, the corrupted input itself (blind_spot: copying the neighbour that replaced the
    pixel; masked_patch: predicting 0, the mean): a network below it has learnt more than that.
    """

    def __init__(self, model, database, tile_size, task, shard_index=0, shard_count=1):
        self.forward = predictor.make_predictor(model)
        crops = _test_crops(database, tile_size, task.settings.test_crops)[shard_index::shard_count]
        self.batches = []
        for start in range(0, len(crops), _TEST_BATCH):
            targets = np.stack(crops[start:start + _TEST_BATCH])
            inputs, weights = task.corrupt(targets, seed=_TEST_SEED + start)
            self.batches.append((np.asarray(inputs), targets, np.asarray(weights)))

    def run(self, combine=lambda totals: totals, should_stop=lambda: False):
        """(row, None, seconds), or None when stopped (see evaluation.Evaluator.run)."""
        start = time.perf_counter()
        totals = {"squared": np.zeros(()), "input": np.zeros(()), "pixels": np.zeros(()), "predicted": np.zeros(())}
        stopped = False
        for inputs, targets, weights in self.batches:
            if should_stop():
                stopped = True
                break
            predictions = np.asarray(self.forward(inputs), dtype=np.float64)
            totals["squared"] += np.sum(np.mean((predictions - targets) ** 2, axis=-1) * weights)
            totals["input"] += np.sum(np.mean((inputs.astype(np.float64) - targets) ** 2, axis=-1) * weights)
            totals["pixels"] += np.sum(weights)
            totals["predicted"] += weights.size
        totals["stopped"] = np.array(1.0 if stopped else 0.0)
        totals = combine(totals)
        if totals["stopped"] > 0:
            return None
        pixels = max(float(totals["pixels"]), 1.0)
        loss, identity = float(totals["squared"]) / pixels, float(totals["input"]) / pixels
        row = {"loss": loss, "input_loss": identity, "loss_ratio": loss / max(identity, 1e-12),
               "test_pixels": int(round(float(totals["predicted"]))),
               "scored_pixels": int(round(float(totals["pixels"])))}
        return row, None, time.perf_counter() - start


def _test_crops(database, tile_size, count):
    """Normalised float32 [T, T, C] centre crops of ``count`` records spread evenly over the database."""
    metadata = records.read_metadata(database)
    total = int(metadata["num_records"])
    indices = sorted({int(i) for i in np.linspace(0, total - 1, min(count, total))})
    crops = []
    env = records.open_database(database)
    try:
        with env.begin() as txn:
            for index in indices:
                record = records.decode(txn.get(records.record_key(index)))
                image = record.image
                top, left = (image.shape[0] - tile_size) // 2, (image.shape[1] - tile_size) // 2
                crop = image[top:top + tile_size, left:left + tile_size]
                crops.append(normalization.normalize(crop, record.statistics).reshape(crop.shape))
    finally:
        env.close()
    return crops


def task_from_config(pretext_dict):
    """The task object of a TrainConfig's ``pretext`` dict."""
    return PretextTask(PretextConfig(**pretext_dict))
