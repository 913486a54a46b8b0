"""Sparse annotations (docs/sparse-labels.md): unlabelled pixels in masks, a loss and metrics that
leave them out, foreground crops on annotated pixels, the uncertainty ranking, and the
correct-and-retrain loop."""
import os

import numpy as np
import pytest
import tifffile

import build_lmdb
import records
from build_lmdb import BuildConfig, BuildError


def _write(folder, masks, shape=(32, 32), seed=0):
    """Images (uint16, brighter where the mask says class 1) and the given masks, stems img_<i>."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        image = rng.integers(100, 200, size=shape, dtype=np.uint16)
        tifffile.imwrite(folder / "images" / f"img_{i}.tif", image)
        tifffile.imwrite(folder / "masks" / f"img_{i}.tif", np.asarray(mask))


def _config(folder, **kwargs):
    return BuildConfig(image_folder=str(folder / "images"), mask_folder=str(folder / "masks"),
                       output_folder=str(folder / "out"), dataset_name="s", train_fraction=1.0, **kwargs)


def _stored_masks(path):
    count = records.read_metadata(str(path))["num_records"]
    env = records.open_database(str(path))
    try:
        with env.begin() as txn:
            return [records.decode_record(txn.get(records.record_key(i)))[1].copy() for i in range(count)]
    finally:
        env.close()


def _scribble_mask(seed):
    """A 32 x 32 scribble painting: 0 = not painted, 1 = background stroke, 2 = a painted object."""
    mask = np.zeros((32, 32), np.uint8)
    mask[2:4, :] = 1
    mask[10 + seed:16 + seed, 10:16] = 2
    return mask


# ----------------------------------------------------------------------------- build_lmdb.py

def test_scribbles_map_painted_labels_to_classes_and_count_annotated_pixels_only(tmp_path, capsys):
    masks = [_scribble_mask(0), _scribble_mask(3)]
    _write(tmp_path, masks)
    code = build_lmdb.main(["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                            "--output_folder", str(tmp_path / "out"), "--dataset_name", "s",
                            "--train_fraction", "1", "--scribbles"])
    assert code == 0
    train = tmp_path / "out" / "train-s.lmdb"
    for stored, painted in zip(_stored_masks(train), masks):
        assert stored.dtype == np.int8
        np.testing.assert_array_equal(stored, painted.astype(np.int16) - 1)  # 0 -> -1, L -> L - 1
    meta = records.read_metadata(str(train))
    assert meta["number_classes"] == 2
    assert meta["class_pixel_counts"] == [2 * 64, 2 * 36]
    assert (meta["annotated_pixels"], meta["unlabelled_pixels"]) == (200, 2 * 1024 - 200)
    assert meta["class_presence"] == [[0, 1], [0, 1]]
    assert (meta["scribbles"], meta["unlabelled_value"], meta["ignore_label"]) == (True, None, -1)
    assert "annotated pixels  200 of 2,048 (9.8%); the rest is unlabelled" in capsys.readouterr().out


def test_unlabelled_value_marks_the_unannotated_pixels_and_keeps_the_class_ids(tmp_path):
    mask = np.full((32, 32), 255, np.uint8)
    mask[:4] = 0
    mask[20:24, 20:26] = 1
    _write(tmp_path, [mask])
    result = build_lmdb.build_databases(_config(tmp_path, unlabelled_value=255), show_progress=False)
    (stored,) = _stored_masks(result.paths["train"])
    expected = np.where(mask == 255, -1, mask.astype(np.int16))
    np.testing.assert_array_equal(stored, expected)
    meta = result.metadata["train"]
    assert meta["class_pixel_counts"] == [128, 24] and meta["unlabelled_pixels"] == 1024 - 152
    assert meta["unlabelled_value"] == 255 and records.annotated_share(meta) == pytest.approx(152 / 1024)


def test_unannotated_masks_and_values_beyond_the_declared_classes_are_refused_by_name(tmp_path):
    empty = np.zeros((32, 32), np.uint8)
    beyond = _scribble_mask(0)
    beyond[30, 30] = 4  # painted label 4 = class 3, with 2 classes declared
    _write(tmp_path, [_scribble_mask(0), empty, beyond])
    with pytest.raises(BuildError) as error:
        build_lmdb.build_databases(_config(tmp_path, scribbles=True, number_classes=2), show_progress=False)
    message = str(error.value)
    assert "2 of 3 pair(s) are not usable" in message
    assert f"{tmp_path / 'masks' / 'img_1.tif'}: mask holds no annotated pixel (every pixel is 0 (unpainted) " \
           "with --scribbles)" in message
    assert f"{tmp_path / 'masks' / 'img_2.tif'}: mask holds painted label(s) 4, beyond --number_classes 2" in message
    assert not (tmp_path / "out").exists()
    # The same value check for dense masks with an unlabelled value: 7 is neither a class nor 255.
    dense = tmp_path / "dense"
    mask = np.full((32, 32), 255, np.uint8)
    mask[:3] = 0
    mask[5, 5] = 7
    _write(dense, [mask])
    with pytest.raises(BuildError, match=r"img_0.tif: mask holds value\(s\) 7 outside --number_classes 2"):
        build_lmdb.build_databases(_config(dense, unlabelled_value=255, number_classes=2), show_progress=False)
    with pytest.raises(BuildError, match="--scribbles and --unlabelled_value 255 exclude each other"):
        _config(dense, unlabelled_value=255, scribbles=True).validate()


def test_databases_built_before_sparse_masks_still_load(tmp_path):
    import imagereader
    from conftest import make_synthetic_db

    path = tmp_path / "old.lmdb"
    make_synthetic_db(path, num_records=4)
    # Strip what this version adds, as a database built before it holds.
    env = records.open_database(str(path), readonly=False)
    with env.begin(write=True) as txn:
        meta = records.decode_metadata(txn.get(records.METADATA_KEY))
        for key in ("annotated_pixels", "unlabelled_pixels"):
            del meta[key]
        txn.put(records.METADATA_KEY, records.encode_metadata(meta))
    env.close()
    meta = records.read_metadata(str(path))
    assert records.annotated_share(meta) == 1.0
    with imagereader.ImageReader(str(path), 2, use_augmentation=False, tile_size=16,
                                 foreground_crop_fraction=1.0) as reader:
        images, masks = reader.get_batch()
    assert images.shape == (2, 16, 16, 1) and masks.min() >= 0


# ----------------------------------------------------------------------------- loss and metrics

@pytest.mark.parametrize("loss_name", ["ce", "dice", "ce+dice"])
def test_unlabelled_pixels_contribute_nothing_and_the_loss_is_the_mean_over_annotated_pixels(loss_name):
    import tensorflow as tf

    import metrics
    import steps

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=(2, 16, 16))
    hidden = rng.random((2, 16, 16)) < 0.7  # unlabelled: 70 % of the pixels
    sparse = np.where(hidden, records.IGNORE_LABEL, truth).astype(np.int32)
    logits_value = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)

    def loss_and_gradient(logits_value, masks):
        logits = tf.Variable(logits_value)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(steps.per_image_loss(logits, tf.constant(masks), loss_name, 3))
        return float(loss), tape.gradient(loss, logits).numpy()

    loss, gradient = loss_and_gradient(logits_value, sparse)
    # Nothing flows back from an unlabelled pixel, whatever class it truly holds ...
    assert np.all(gradient[hidden] == 0) and np.any(gradient[~hidden] != 0)
    # ... so changing the network's output there (or the class hidden there) changes nothing.
    other = np.where(hidden[..., None], rng.normal(size=logits_value.shape) * 10, logits_value).astype(np.float32)
    other_loss, other_gradient = loss_and_gradient(other, sparse)
    assert other_loss == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(other_gradient, gradient, rtol=1e-5, atol=1e-7)
    # The value: each image's mean over its annotated pixels (cross-entropy), soft Dice over them.
    shifted = logits_value - logits_value.max(-1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    expected = []
    for b in range(2):
        keep = ~hidden[b]
        p, t = probabilities[b][keep], truth[b][keep]
        terms = []
        if "ce" in steps.LOSS_TERMS[loss_name]:
            terms.append(-np.log(p[np.arange(len(t)), t]).mean())
        if "dice" in steps.LOSS_TERMS[loss_name]:
            onehot = np.eye(3)[t]
            dice = (2 * (p * onehot).sum(0) + 1) / (p.sum(0) + onehot.sum(0) + 1)
            terms.append(1 - dice[1:].mean())
        expected.append(sum(terms))
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)
    # Metrics count annotated pixels only.
    predicted = probabilities.argmax(-1)
    confusion = metrics.confusion_matrix(sparse, predicted, 3)
    assert confusion.sum() == np.count_nonzero(~hidden)
    assert metrics.pixel_accuracy(confusion) == pytest.approx(np.mean(predicted[~hidden] == truth[~hidden]))


def _sparse_db(path, masks, seed=0):
    """A real train database of uint16 images and the given int8 masks (-1 = unlabelled)."""
    rng = np.random.default_rng(seed)

    def pairs():
        for i, mask in enumerate(masks):
            image = (rng.normal(500, 50, mask.shape) + 1000 * (mask == 1)).astype(np.uint16)
            yield image, mask.astype(np.int8), {"image": f"img_{i}.tif", "mask": f"img_{i}.tif"}

    return records.write_database(str(path), pairs(), {"split": "train", "split_seed": 0, "train_fraction": 1.0})


def test_foreground_crops_land_on_annotated_foreground_and_unannotated_records_cannot_hang(tmp_path, capfd):
    import imagereader

    # Foreground everywhere in truth, but annotated only in one 8 x 8 square (and a background stroke).
    mask = np.full((96, 96), -1, np.int8)
    mask[60:68, 70:78] = 1
    mask[5:7, :] = 0
    _sparse_db(tmp_path / "sparse.lmdb", [mask])
    with imagereader.ImageReader(str(tmp_path / "sparse.lmdb"), 4, use_augmentation=False,
                                 tile_size=32, foreground_crop_fraction=1.0, seed=3) as reader:
        for _ in range(5):
            _, masks = reader.get_batch()
            assert all((crop == 1).any() for crop in masks)
    # Random crops (no foreground placement) are redrawn until they hold an annotated pixel.
    with imagereader.ImageReader(str(tmp_path / "sparse.lmdb"), 4, use_augmentation=False,
                                 tile_size=32, seed=3) as reader:
        for _ in range(5):
            _, masks = reader.get_batch()
            assert all((crop >= 0).any() for crop in masks)
    # A record without any annotated pixel: crops are taken after the bounded redraws, with a warning.
    _sparse_db(tmp_path / "empty.lmdb", [np.full((48, 48), -1, np.int8)])
    with imagereader.ImageReader(str(tmp_path / "empty.lmdb"), 2, use_augmentation=False,
                                 tile_size=32, foreground_crop_fraction=0.5) as reader:
        for _ in range(6):
            _, masks = reader.get_batch()
            assert np.all(masks == -1)
    err = capfd.readouterr().err
    assert (f"warning: {tmp_path / 'empty.lmdb'}: 1 training crop(s) of reader worker 0 held no annotated pixel "
            "and add nothing to the loss (latest: record 0: the record holds no annotated pixel; records of "
            "tiles of sparse masks do this") in err
    assert "10 training crop(s) of reader worker 0" in err


def test_a_small_stroke_in_a_large_record_is_in_every_crop_also_after_augmentation(tmp_path, capfd):
    import imagereader

    # One 12 x 6 px stroke per 256 px record: before, uniform redraws missed it in about one 64 px
    # crop of three, and zoom / rotation / elastic moved it out of one augmented crop in ten.
    masks = []
    for i in range(4):
        mask = np.full((256, 256), -1, np.int8)
        mask[40 + 40 * i:52 + 40 * i, 200 - 30 * i:206 - 30 * i] = i % 2
        masks.append(mask)
    _sparse_db(tmp_path / "strokes.lmdb", masks)
    for augmented in (False, True):
        with imagereader.ImageReader(str(tmp_path / "strokes.lmdb"), 8, use_augmentation=augmented,
                                     tile_size=64, seed=5) as reader:
            crops = np.concatenate([reader.get_batch()[1] for _ in range(25)])
        assert crops.shape == (200, 64, 64)
        assert all((crop >= 0).any() for crop in crops)
    assert "warning" not in capfd.readouterr().err


def test_the_test_pass_scores_annotated_pixels_only(tmp_path):
    import evaluation
    import models

    rng = np.random.default_rng(0)
    masks = []
    for _ in range(2):
        mask = rng.integers(0, 2, size=(40, 48)).astype(np.int8)
        mask[rng.random(mask.shape) < 0.6] = -1
        masks.append(mask)
    _sparse_db(tmp_path / "test.lmdb", masks)
    model = models.build_model("unet", 2, input_channels=1, base_filters=4, unet_depth=2)
    evaluator = evaluation.Evaluator(model, "unet", str(tmp_path / "test.lmdb"), 2, "ce",
                                     options={"unet_depth": 2})
    row, examples, _ = evaluator.run()
    annotated = sum(int(np.count_nonzero(m >= 0)) for m in masks)
    assert (row["test_pixels"], row["annotated_pixels"]) == (2 * 40 * 48, annotated)
    # The accuracy is that of the annotated pixels of the predictions shown.
    _, true_masks, predicted = examples
    keep = true_masks >= 0
    assert row["pixel_accuracy"] == pytest.approx(np.mean(predicted[keep] == true_masks[keep]))


# ----------------------------------------------------------------------------- uncertainty ranking

def test_uncertainty_ranks_images_by_mean_normalised_entropy(tmp_path):
    import uncertainty

    certain = np.zeros((4, 5, 3), np.float32)
    certain[..., 0] = 30.0  # one class wins by far: entropy ~ 0
    uniform = np.zeros((4, 5, 3), np.float32)  # all three classes equally likely: entropy 1
    half = np.concatenate([certain[:2], uniform[:2]])
    np.testing.assert_allclose(uncertainty.normalized_entropy(uniform), 1.0, rtol=1e-6)
    assert float(uncertainty.normalized_entropy(certain).max()) < 1e-9
    rows = []
    for name, logits in (("a.tif", certain), ("b.tif", uniform), ("c.tif", half)):
        tally = uncertainty.ImageUncertainty()
        for band in (logits[:1], logits[1:]):  # fed band by band, as inference.py does
            tally.add(uncertainty.normalized_entropy(band))
        rows.append(tally.row(name))
    uncertainty.write_ranking(tmp_path / "u.csv", rows)
    lines = (tmp_path / "u.csv").read_text().splitlines()
    assert lines[0] == "rank,image,mean_entropy,uncertain_share,pixels"
    assert [line.split(",")[:2] for line in lines[1:]] == [["1", "b.tif"], ["2", "c.tif"], ["3", "a.tif"]]
    assert lines[2].split(",")[2:] == ["0.500000", "0.500000", "20"]


# ----------------------------------------------------------------------------- correct and retrain

def _blob_pairs(folder, count, seed):
    """Images of bright discs on a dark noisy ground and their dense 0/1 masks."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:64, :64]
    for i in range(count):
        mask = np.zeros((64, 64), np.uint8)
        for _ in range(3):
            cy, cx = rng.integers(8, 56, size=2)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 1
        image = (rng.normal(300, 40, mask.shape) + 900.0 * mask).clip(0).astype(np.uint16)
        tifffile.imwrite(folder / "images" / f"img_{seed}_{i}.tif", image)
        tifffile.imwrite(folder / "masks" / f"img_{seed}_{i}.tif", mask)


def test_correct_and_retrain_fine_tunes_from_the_old_weights(tmp_path, monkeypatch, capsys):
    import checkpoints
    import inference
    import trainer

    def tiny(train, test, output_dir, **overrides):
        values = dict(batch_size=2, tile_size=32, base_filters=4, unet_depth=2, test_every_n_steps=2,
                      log_every_n_steps=100, use_augmentation=False, learning_rate=0.01)
        values.update(overrides)
        return trainer.TrainConfig("unet", str(train), str(test), str(output_dir), **values)

    # 1. A first model from dense masks.
    _blob_pairs(tmp_path / "first", 4, seed=0)
    first = build_lmdb.build_databases(BuildConfig(
        image_folder=str(tmp_path / "first" / "images"), mask_folder=str(tmp_path / "first" / "masks"),
        output_folder=str(tmp_path / "db1"), dataset_name="a", train_fraction=0.75), show_progress=False)
    assert trainer.train(tiny(first.paths["train"], first.paths["test"], tmp_path / "run1", max_steps=4))["exit_code"] == 0

    # 2. Masks and an uncertainty ranking for new images.
    _blob_pairs(tmp_path / "new", 3, seed=1)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(tmp_path / "new" / "images"), output_folder=str(tmp_path / "predicted"),
        model=str(tmp_path / "run1"), gpu=-1, uncertainty_csv=str(tmp_path / "ranking.csv")))
    assert summary.failed_count == 0
    ranking = (tmp_path / "ranking.csv").read_text().splitlines()
    assert len(ranking) == 4 and [float(line.split(",")[2]) for line in ranking[1:]] == sorted(
        (float(line.split(",")[2]) for line in ranking[1:]), reverse=True)

    # 3. The user corrects only a region of each predicted mask (the rest left unlabelled, 255) and
    #    keeps the dense masks of the first images: one enlarged sparse set.
    pool = tmp_path / "pool"
    (pool / "images").mkdir(parents=True)
    (pool / "masks").mkdir()
    for source in (tmp_path / "first" / "images").iterdir():
        os.symlink(source, pool / "images" / source.name)
        os.symlink(tmp_path / "first" / "masks" / source.name, pool / "masks" / source.name)
    for source in (tmp_path / "new" / "images").iterdir():
        os.symlink(source, pool / "images" / source.name)
        truth = tifffile.imread(tmp_path / "new" / "masks" / source.name)
        corrected = np.full_like(truth, 255)
        corrected[:32] = truth[:32]  # painted where the prediction was checked; the rest unlabelled
        tifffile.imwrite(pool / "masks" / source.name, corrected)
    second = build_lmdb.build_databases(BuildConfig(
        image_folder=str(pool / "images"), mask_folder=str(pool / "masks"), output_folder=str(tmp_path / "db2"),
        dataset_name="b", train_fraction=0.75, unlabelled_value=255, number_classes=2), show_progress=False)
    assert 0 < records.annotated_share(second.metadata["train"]) < 1

    # 4. Fine-tune: before its first step the model predicts exactly what the old one predicts.
    fixed = tifffile.imread(next((tmp_path / "new" / "images").iterdir()))[None, :, :, None]
    fixed = ((fixed - fixed.mean()) / fixed.std()).astype(np.float32)
    old = checkpoints.load_trained(checkpoints.find_checkpoint(str(tmp_path / "run1"))).model
    seen = []
    original = trainer.Run.train_one_step

    def predict_then_step(self, state):
        if not seen:
            seen.append(np.asarray(self.model(fixed, training=False)))
        return original(self, state)

    monkeypatch.setattr(trainer.Run, "train_one_step", predict_then_step)
    capsys.readouterr()
    result = trainer.train(tiny(second.paths["train"], second.paths["test"], tmp_path / "run2", max_steps=2,
                                restore_checkpoint_filepath=str(tmp_path / "run1")))
    out, err = capsys.readouterr()
    np.testing.assert_allclose(seen[0], np.asarray(old(fixed, training=False)), rtol=1e-5, atol=1e-5)
    fresh = trainer.build_model(tiny(second.paths["train"], second.paths["test"], tmp_path / "x"), 1)
    assert not np.allclose(seen[0], np.asarray(fresh(fixed, training=False)), atol=1e-3)
    # What restarts: the step counter (2 steps were run, not 4 + 2), the history and the CSVs.
    assert (result["exit_code"], result["step"], result["epoch"]) == (0, 2, 1)
    assert f"fine-tuning from {tmp_path / 'run1' / 'checkpoints' / 'latest'}: every layer's weights restored" in out
    assert "is not the database the checkpoint was trained on" in err
    rows = (tmp_path / "run2" / "test_metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,2,")
    assert (tmp_path / "run2" / "model.keras").is_file()
