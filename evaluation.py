"""The test pass: every test image predicted whole, exactly as ``inference.py`` predicts it.

The test loss chooses the exported model and drives early stopping, so it must describe the masks a
user gets. Each record of a test database is one whole source image (build_lmdb.py never tiles the
test split). It is normalised with its source image's statistics and predicted by the tiled
predictor inference.py uses (predictor.predict_image: the same reflect padding, halos covering the
receptive field and default tile-size rule), so every source pixel is counted exactly once and the
confusion matrix of a pass is that of the masks inference.py writes for these images with these
weights. The loss comes from the same per-pixel sums as the training loss (steps.pixel_sums).

With several workers each predicts its share of the images (records ``worker::workers``); the sums
are added across workers once at the end, together with a "stopped" flag, so that a stop signal on
any worker makes every worker drop the pass at the same point (no worker is left waiting in the
collective). Within a worker the images are predicted on the default device, one after the other.

Precision and memory, as inference.py has them:
  - the pass predicts in float32 whatever --mixed_precision: a model computing in float16 /
    bfloat16 is predicted through a float32 twin holding its current weights (the twin is what
    model.keras holds), so early stopping and the best checkpoint are chosen on the predictions
    inference.py makes;
  - the default tile comes from the free memory of the device the pass runs on (the training GPU,
    not the host's RAM), and an out-of-memory error halves the tile (down to the model's smallest)
    and predicts the image again: tiling never changes the result, only the speed.
"""
import sys
import time

import numpy as np

import metrics
import models
import predictor
import records
import steps
from errors import TrainingError


class Evaluator:
    """Predicts the whole test images with the training model and scores them.

    Args:
      model: the training model (its current weights are used at every pass).
      model_name: registry name (size divisor and halo of the predictor).
      test_database: path of the test LMDB.
      number_classes, loss_name: as in training.
      shard_index, shard_count: this worker's share of the test images.
      batch_size: tiles per network call.
      tile_size: tile side; None = inference.py's default rule for this model and ``device``.
      options: the network's shape options (config keys, e.g. unet_depth); None = defaults. The
        trainer gives name and options; their models.Geometry is computed here, once.
      device: the device whose free memory sizes the default tile (predictor.available_memory_bytes:
        "/GPU:<index as nvidia-smi numbers it>" or "/CPU:0"); None = the one the pass runs on
        (predictor.default_memory_device: the training GPU, else the CPU).
    """

    def __init__(self, model, model_name, test_database, number_classes, loss_name, shard_index=0,
                 shard_count=1, batch_size=1, tile_size=None, options=None, device=None):
        self.geometry = models.geometry(model_name, **(options or {}))
        self.test_database = test_database
        self.number_classes, self.loss_name = number_classes, loss_name
        self.shard_index, self.shard_count, self.batch_size = shard_index, shard_count, batch_size
        self.model, self.device = model, device or predictor.default_memory_device()
        self.twin = float32_twin(model)
        predicting = self.twin if self.twin is not None else model
        self.tile_size = tile_size or predictor.default_tile_size(predicting, self.geometry, batch_size,
                                                                  device=self.device)
        self.forward = predictor.make_predictor(predicting)

    def run(self, combine=lambda totals: totals, should_stop=lambda: False):
        """One pass over this worker's test images.

        Args:
          combine: sums a nested structure of float64 arrays over all workers (identity on one).
          should_stop: polled between images; true on any worker drops the pass on every worker.
        Returns:
          (row, examples, seconds) or None when stopped. row: loss, pixel_accuracy, iou_k, dice_k,
          mean_iou, test_pixels (all pixels predicted), annotated_pixels (those scored); examples: (raw images, true masks, predicted masks) of up to 3
          test images of the first one's shape, for TensorBoard, or None when this worker has none.
        """
        k = self.number_classes
        start = time.perf_counter()
        terms = ("ce", "dice") + tuple(t for t in steps.LOSS_TERMS[self.loss_name] if t not in ("ce", "dice"))
        totals = {"image_pixels": np.zeros(()), "pixels": np.zeros(()), "ce_sum": np.zeros(()), "intersection": np.zeros(k),
                  "prob_sum": np.zeros(k), "label_sum": np.zeros(k), "skeleton_hit": np.zeros(k),
                  "skeleton_sum": np.zeros(k), "confusion": np.zeros((k, k))}
        examples, stopped = [], False
        if self.twin is not None:  # this pass scores the current weights
            self.twin.set_weights(self.model.get_weights())
        for _, image, mask, stats, _ in records.iter_source_records(self.test_database, self.shard_index,
                                                                    self.shard_count):
            if should_stop():
                stopped = True
                break
            labels = mask.astype(np.int32)
            logits = self.predict(image, stats)
            sums = steps.pixel_sums(logits[None], labels[None], k, terms, axis=(0, 1, 2), dtype="float64")
            for name, value in sums._asdict().items():
                if value is not None:
                    totals[name] = totals[name] + np.asarray(value, dtype=np.float64)
            totals["image_pixels"] = totals["image_pixels"] + labels.size
            predicted = np.argmax(logits, axis=-1)
            totals["confusion"] += metrics.confusion_matrix(labels, predicted, k)
            if len(examples) < 3 and (not examples or image.shape == examples[0][0].shape):
                examples.append((image, labels, predicted))
        totals["stopped"] = np.array(1.0 if stopped else 0.0)
        totals = combine(totals)
        if totals["stopped"] > 0:
            return None
        pixel_sums = steps.PixelSums(**{name: totals[name] for name in steps.PixelSums._fields})
        row = {"loss": float(steps.loss_from_sums(pixel_sums, self.loss_name)),
               **metrics.summarize(np.rint(totals["confusion"]).astype(np.int64)),
               # All pixels predicted, and those scored: a sparse test mask scores its annotated ones.
               "test_pixels": int(round(float(totals["image_pixels"]))),
               "annotated_pixels": int(round(float(totals["pixels"])))}
        shown = tuple(np.stack(parts) for parts in zip(*examples)) if examples else None
        return row, shown, time.perf_counter() - start

    def predict(self, image, stats):
        """Logits of one whole test image; on out-of-memory, again with half the tile (kept for the
        following images) down to the model's smallest tile, then TrainingError."""
        import tensorflow as tf

        while True:
            try:
                return predictor.predict_image(self.forward, image, stats, self.geometry, self.tile_size,
                                               self.batch_size)
            except tf.errors.ResourceExhaustedError:
                smallest = self.geometry.smallest_tile
                if self.tile_size <= smallest:
                    raise TrainingError(
                        f"the test pass ran out of memory on {self.device} even with {self.geometry.name}'s "
                        f"smallest tile ({smallest} px, batch {self.batch_size}): free that device's memory "
                        "(other processes on it?) or train a smaller network (--base_filters)") from None
                divisor = self.geometry.size_divisor
                smaller = max(smallest, self.tile_size // 2 - (self.tile_size // 2) % divisor)
                print(f"warning: the test pass ran out of memory on {self.device} with {self.tile_size} px "
                      f"tiles; predicting with {smaller} px tiles from now on (same results, slower)",
                      file=sys.stderr, flush=True)
                self.tile_size = smaller


def float32_twin(model):
    """A float32 copy of ``model`` (weights copied at every pass), or None when it already computes in
    float32. Under --mixed_precision the training model computes in float16 / bfloat16, inference.py
    runs the float32 model.keras: measured on a tiny UNet, their logits differ by ~1e-3 (float16)."""
    twin = models.with_precision(model, "float32")
    return None if twin is model else twin
