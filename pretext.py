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

    blind_spot(images, fraction, radius, seed) -> (inputs, weights)   the masking
    masked_mse(predictions, targets, weights) -> loss per image         the loss, masked pixels only
    PretextConfig                                                        the task's settings (config.json)
    BlindSpotTask                                                        the trainer's hook (trainer.py)

The trainer (trainer.py) runs this task through the same loop, readers, towers, checkpoints, resume
and signals as segmentation training; the task object gives it the train step's loss, the test pass
and what a test line shows. Importing this module does not import TensorFlow.
"""
import dataclasses
import time

import numpy as np

import normalization
import records
import steps

TASKS = ("blind_spot",)
# Noise2Void masks ~0.2-2 % of a patch per step; more masked pixels give more loss terms per step,
# but each one's neighbourhood then holds more replaced pixels.
DEFAULT_MASK_FRACTION = 0.015
DEFAULT_RADIUS = 2  # a 5 x 5 window, Noise2Void's default
DEFAULT_TEST_CROPS = 16
_TEST_SEED = 20261203  # the test pass masks the same pixels at every pass, so its losses compare
_TEST_BATCH = 4


@dataclasses.dataclass
class PretextConfig:
    """The pretext task's settings, saved in config.json under "pretext".

    task: one of TASKS. mask_fraction: share of the pixels of a crop replaced (and scored) per step.
    radius: the neighbour a replaced pixel takes its value from lies within this many pixels.
    test_crops: crops (one per record, spread over the database) the test pass scores.
    """
    task: str = "blind_spot"
    mask_fraction: float = DEFAULT_MASK_FRACTION
    radius: int = DEFAULT_RADIUS
    test_crops: int = DEFAULT_TEST_CROPS

    def problems(self):
        """Messages naming the flag of every unusable value ([] when all are usable)."""
        found = []
        if self.task not in TASKS:
            found.append(f"--pretext_task {self.task!r}: expected one of {', '.join(TASKS)}")
        if not 0.0 < self.mask_fraction <= 0.25:
            found.append(f"--mask_fraction {self.mask_fraction}: expected a share in (0, 0.25] (Noise2Void "
                         "uses 0.002 to 0.02); with more, the neighbours of a masked pixel are masked too")
        if not 1 <= self.radius <= 8:
            found.append(f"--neighbour_radius {self.radius}: expected 1 to 8 pixels")
        if self.test_crops < 1:
            found.append(f"--test_crops {self.test_crops}: expected an integer >= 1")
        return found


def add_arguments(parser):
    """The pretext flags of pretrain_unet.py."""
    group = parser.add_argument_group("pretext task")
    group.add_argument("--pretext_task", default="blind_spot", choices=TASKS,
                       help="blind_spot: Noise2Void-style denoising, the masked pixels predicted from their "
                            "neighbours (default %(default)s)")
    group.add_argument("--mask_fraction", type=float, default=DEFAULT_MASK_FRACTION,
                       help="share of the pixels of each crop replaced by a neighbour's value and scored "
                            "(default %(default)g)")
    group.add_argument("--neighbour_radius", type=int, default=DEFAULT_RADIUS,
                       help="a replaced pixel takes the value of a random pixel at most this far away "
                            "(default %(default)s: a 5 x 5 window)")
    group.add_argument("--test_crops", type=int, default=DEFAULT_TEST_CROPS,
                       help="crops of --tile_size, one per record spread over the database, that the test "
                            "pass scores with fixed masked pixels (default %(default)s)")


def config_from_args(args):
    return PretextConfig(task=args.pretext_task, mask_fraction=args.mask_fraction, radius=args.neighbour_radius,
                         test_crops=args.test_crops)


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

class BlindSpotTask:
    """Blind-spot denoising as the trainer's task (see trainer.SegmentationTask for the interface)."""

    test_columns = ["epoch", "step", "loss", "neighbour_loss", "loss_ratio", "test_pixels", "test_seconds",
                    "starvation_s", "wall_time_s"]
    metric_curves = [("loss_ratio", "loss / loss of copying the neighbour")]

    def __init__(self, settings):
        self.settings = settings

    def make_train_step(self, strategy, model, optimizer, config, global_batch):
        import tensorflow as tf

        settings = self.settings

        def batch_loss(images, masks):
            inputs, weights = blind_spot(images, settings.mask_fraction, settings.radius)
            # Pixels the reader marks as ignored (-1: outside the image after augmentation) are never scored.
            weights *= tf.cast(masks >= 0, tf.float32)
            return masked_mse(model(inputs, training=True), images, weights)

        return steps.make_step(strategy, model, optimizer, batch_loss, global_batch, jit_compile=config.xla)

    def make_evaluator(self, model, config, info):
        return BlindSpotEvaluator(model, config.test_database, config.tile_size, self.settings,
                                  shard_index=info.worker_index, shard_count=info.num_workers)

    def describe(self, row):
        return (f"test loss {row['loss']:.4f}  copying the neighbour {row['neighbour_loss']:.4f}  "
                f"ratio {row['loss_ratio']:.3f}")


class BlindSpotEvaluator:
    """The pretext test pass: the masked-pixel loss of fixed crops with fixed masked pixels.

    ``test_crops`` records spread over the database are centre-cropped to ``tile_size`` and normalised
    with their source image's statistics, once; the masked pixels come from a fixed seed, so every
    pass scores the same pixels and the test losses of a run compare. ``neighbour_loss`` is the loss
    of the identity (copying the neighbour that replaced the pixel): a network below it predicts
    more than a neighbour tells.
    """

    def __init__(self, model, database, tile_size, settings, shard_index=0, shard_count=1):
        import predictor

        self.forward = predictor.make_predictor(model)
        crops = _test_crops(database, tile_size, settings.test_crops)[shard_index::shard_count]
        self.batches = []
        for start in range(0, len(crops), _TEST_BATCH):
            targets = np.stack(crops[start:start + _TEST_BATCH])
            inputs, weights = blind_spot(targets, settings.mask_fraction, settings.radius, seed=_TEST_SEED + start)
            self.batches.append((np.asarray(inputs), targets, np.asarray(weights)))

    def run(self, combine=lambda totals: totals, should_stop=lambda: False):
        """(row, None, seconds), or None when stopped (see evaluation.Evaluator.run)."""
        start = time.perf_counter()
        totals = {"squared": np.zeros(()), "neighbour": np.zeros(()), "pixels": np.zeros(())}
        stopped = False
        for inputs, targets, weights in self.batches:
            if should_stop():
                stopped = True
                break
            predictions = np.asarray(self.forward(inputs), dtype=np.float64)
            totals["squared"] += np.sum(np.mean((predictions - targets) ** 2, axis=-1) * weights)
            totals["neighbour"] += np.sum(np.mean((inputs.astype(np.float64) - targets) ** 2, axis=-1) * weights)
            totals["pixels"] += np.sum(weights)
        totals["stopped"] = np.array(1.0 if stopped else 0.0)
        totals = combine(totals)
        if totals["stopped"] > 0:
            return None
        pixels = max(float(totals["pixels"]), 1.0)
        loss, neighbour = float(totals["squared"]) / pixels, float(totals["neighbour"]) / pixels
        row = {"loss": loss, "neighbour_loss": neighbour, "loss_ratio": loss / max(neighbour, 1e-12),
               "test_pixels": int(round(float(totals["pixels"])))}
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
    return BlindSpotTask(PretextConfig(**pretext_dict))
