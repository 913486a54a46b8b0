"""The training output folder: CSVs, TensorBoard logs and plots (written by the chief only).

Layout: config.json, train_loss.csv, test_metrics.csv, plots/{loss,metrics}.png, tensorboard/,
checkpoints/{latest,best}/ (checkpoints.py), model.keras (checkpoints.export_model).
"""
import csv
import os

import numpy as np

import plots


class Outputs:
    """The output folder. Only the chief writes; on other workers every method does nothing."""
    TRAIN_COLUMNS = ["step", "loss", "step_time_s", "images_per_s"]

    def __init__(self, output_dir, number_classes, enabled, resume_state=None, test_columns=None,
                 metric_curves=None):
        """``test_columns`` / ``metric_curves`` (plots.plot_metrics' curves): a pretext task's own; None
        for segmentation's."""
        self.dir = output_dir
        self.enabled = enabled
        self.number_classes = number_classes
        self.test_columns = test_columns or (["epoch", "step", "loss", "pixel_accuracy"]
                                             + [f"iou_{k}" for k in range(number_classes)]
                                             + [f"dice_{k}" for k in range(number_classes)]
                                             + ["mean_iou", "test_pixels", "annotated_pixels", "test_seconds",
                                                "starvation_s", "wall_time_s"])
        self.metric_curves = metric_curves
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
        truncate_csv(self.train_csv, self.TRAIN_COLUMNS, lambda row: int(row["step"]) <= keep_step)
        truncate_csv(self.test_csv, self.test_columns, lambda row: int(row["epoch"]) <= keep_epoch)
        # TensorBoard would show both histories at the steps past the checkpoint: the same cut.
        truncate_events(os.path.join(output_dir, "tensorboard"), keep_step)
        self._train_file = open(self.train_csv, "a", newline="")
        self._train_rows = csv.writer(self._train_file)
        import tensorflow as tf
        self._writer = tf.summary.create_file_writer(os.path.join(output_dir, "tensorboard"))

    def log_step(self, step, loss, step_time, images_per_s):
        if self.enabled:
            self._train_rows.writerow([step, f"{loss:.6g}", f"{step_time:.4f}", f"{images_per_s:.2f}"])

    def log_scalars(self, step, scalars):
        if self.enabled:
            import tensorflow as tf
            with self._writer.as_default(step=step):
                for name, value in scalars.items():
                    tf.summary.scalar(name, float(value))

    def log_test(self, row, examples):
        """Append one test_metrics.csv row, write TensorBoard scalars and images (``examples`` =
        (images, true masks, predicted masks) or None), redraw the plots."""
        if not self.enabled:
            return
        import tensorflow as tf

        with open(self.test_csv, "a", newline="") as f:
            csv.DictWriter(f, self.test_columns).writerow({k: _format(row[k]) for k in self.test_columns})
        self._train_file.flush()
        with self._writer.as_default(step=row["step"]):
            for name in self.test_columns[2:]:
                tf.summary.scalar(f"test/{name}", float(row[name]))
            if examples is not None:
                images, true_masks, predicted_masks = examples
                channel = images[..., :3] if images.shape[-1] == 3 else images[..., :1]
                low, high = channel.min(), channel.max()
                count = len(images)
                tf.summary.image("test/image", ((channel - low) / max(high - low, 1e-6)).astype(np.float32),
                                 max_outputs=count)
                scale = 1.0 / max(self.number_classes - 1, 1)
                true_rgb = np.repeat(np.clip(true_masks, 0, None)[..., None] * scale, 3, axis=-1).astype(np.float32)
                true_rgb[true_masks < 0] = (1.0, 0.0, 1.0)  # unlabelled pixels of a sparse mask: magenta, not class 0
                tf.summary.image("test/true_mask", true_rgb, max_outputs=count)
                tf.summary.image("test/predicted_mask", (predicted_masks[..., None] * scale).astype(np.float32),
                                 max_outputs=count)
        self._writer.flush()
        plots.save_training_plots(self.dir, self.number_classes, self.metric_curves)

    def close(self):
        if self._train_file is not None:
            self._train_file.close()
            self._writer.close()
            self._train_file = None


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def truncate_events(folder, keep_step):
    """Rewrite the TensorBoard event files in ``folder`` keeping only the events of steps up to
    ``keep_step`` (a killed writer's incomplete last record is dropped too). Event files are
    TFRecord files of Event messages; TensorBoard itself never drops the steps a resumed run
    repeats (TF2's writers emit no restart marker)."""
    import glob

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    import image_io

    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        records, complete = [], True
        try:
            for record in tf.data.TFRecordDataset(path):
                records.append(record.numpy())
        except tf.errors.DataLossError:  # cut short by a kill
            complete = False
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= keep_step]
        if complete and len(kept) == len(records):
            continue

        def write(temporary, kept=kept):
            with tf.io.TFRecordWriter(str(temporary)) as writer:
                for record in kept:
                    writer.write(record)

        image_io.atomic_write(path, write, mode=None)


def truncate_csv(path, columns, keep):
    """Rewrite ``path`` with a header and only the rows ``keep`` accepts (create it if missing)."""
    rows = [row for row in plots.read_csv(path) if keep(row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
