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
"""
import time

import numpy as np

import metrics
import predictor
import records
import steps


class Evaluator:
    """Predicts the whole test images with the training model and scores them.

    Args:
      model: the training model (its current weights are used at every pass).
      model_name: registry name (size divisor and halo of the predictor).
      test_database: path of the test LMDB.
      number_classes, loss_name: as in training.
      shard_index, shard_count: this worker's share of the test images.
      batch_size: tiles per network call.
      tile_size: tile side; None = inference.py's default rule for this model.
      options: the network's shape options (config keys, e.g. unet_depth); None = defaults.
    """

    def __init__(self, model, model_name, test_database, number_classes, loss_name, shard_index=0,
                 shard_count=1, batch_size=1, tile_size=None, options=None):
        self.model_name, self.options, self.test_database = model_name, options, test_database
        self.number_classes, self.loss_name = number_classes, loss_name
        self.shard_index, self.shard_count, self.batch_size = shard_index, shard_count, batch_size
        self.tile_size = tile_size or predictor.default_tile_size(model, model_name, batch_size, options=options)
        self.forward = predictor.make_predictor(model)

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
        totals = {"image_pixels": np.zeros(()), "pixels": np.zeros(()), "ce_sum": np.zeros(()), "intersection": np.zeros(k),
                  "prob_sum": np.zeros(k), "label_sum": np.zeros(k), "confusion": np.zeros((k, k))}
        examples, stopped = [], False
        for _, image, mask, stats, _ in records.iter_source_records(self.test_database, self.shard_index,
                                                                    self.shard_count):
            if should_stop():
                stopped = True
                break
            labels = mask.astype(np.int32)
            logits = predictor.predict_image(self.forward, image, stats, self.model_name, self.tile_size,
                                             self.batch_size, options=self.options)
            sums = steps.pixel_sums(logits[None], labels[None], k, axis=(0, 1, 2), dtype="float64")
            for name, value in sums._asdict().items():
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
