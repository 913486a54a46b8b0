"""Self-supervised pretraining: build_lmdb.py --unlabelled_only, the blind-spot pretext task
(pretext.py), pretrain_unet.py through the trainer (loss, SIGTERM and resume) and train_unet.py
--init_from (exact weights, a fresh head, refusals that write nothing)."""
import csv
import json
import os
import signal

import numpy as np
import pytest
import tifffile

import build_lmdb
import checkpoints
import pretext
import pretrain_unet
import records
import trainer
from conftest import make_synthetic_db

# A 2-level UNet without batch norm (so a run at learning rate 0 leaves every weight as it was).
TINY = ["--batch_size", "4", "--tile_size", "32", "--base_filters", "4", "--unet_depth", "2", "--batch_norm", "0",
        "--log_every_n_steps", "100", "--use_augmentation", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_main(main, capsys, args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_unlabelled_images(folder, count=6, shape=(64, 64), seed=0):
    """Images of bright 8 x 8 blocks on a dark background plus pixel noise: the blocks can be
    predicted from a pixel's neighbours, the noise cannot."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    images = {}
    for i in range(count):
        blocks = rng.integers(0, 2, size=(shape[0] // 8, shape[1] // 8))
        clean = 1000.0 * np.kron(blocks, np.ones((8, 8))) + 500
        image = np.clip(clean + rng.normal(0, 100, shape), 0, 65535).astype(np.uint16)
        tifffile.imwrite(str(folder / f"img_{i:02d}.tif"), image)
        images[f"img_{i:02d}"] = image
    return images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    images = write_unlabelled_images(root / "unlabelled")
    build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(root / "unlabelled"), mask_folder=None, output_folder=str(root / "db"), dataset_name="u",
        train_fraction=1.0, tile_size=32, unlabelled_only=True), show_progress=False)
    make_synthetic_db(root / "train", num_records=8, shape=(64, 64), seed=0)
    make_synthetic_db(root / "test", num_records=2, shape=(64, 64), seed=1)
    return {"root": root, "images": images, "unlabelled": root / "db" / "unlabelled-u.lmdb",
            "labelled": ["--train_database", root / "train", "--test_database", root / "test"]}


# ---------------------------------------------------------------------------------------------
# The pretext task
# ---------------------------------------------------------------------------------------------

def test_blind_spot_replaces_only_the_masked_pixels_each_by_a_neighbour():
    # Every pixel value is unique, so a replaced pixel tells which pixel it was copied from.
    images = np.arange(2 * 40 * 48 * 2, dtype=np.float32).reshape(2, 40, 48, 2)
    inputs, weights = (np.asarray(a) for a in pretext.blind_spot(images, 0.02, radius=2, seed=7))
    assert weights.shape == (2, 40, 48) and set(np.unique(weights)) == {0.0, 1.0}
    assert 0.005 < weights.mean() < 0.04  # about the asked 2 %
    unmasked = weights == 0
    np.testing.assert_array_equal(inputs[unmasked], images[unmasked])
    for b, y, x in zip(*np.nonzero(weights)):
        assert not np.array_equal(inputs[b, y, x], images[b, y, x])
        source = np.argwhere(images[b] == inputs[b, y, x, 0])[0]  # (row, col, channel 0) it came from
        dy, dx = source[0] - y, source[1] - x
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= 2
        np.testing.assert_array_equal(inputs[b, y, x], images[b, source[0], source[1]])  # all channels
    # A fixed seed draws the same pixels; another seed others.
    np.testing.assert_array_equal(np.asarray(pretext.blind_spot(images, 0.02, seed=7)[1]), weights)
    assert not np.array_equal(np.asarray(pretext.blind_spot(images, 0.02, seed=8)[1]), weights)


def test_masked_patches_hide_whole_squares_and_nothing_else():
    images = np.arange(1, 2 * 36 * 40 + 1, dtype=np.float32).reshape(2, 36, 40, 1)  # no pixel is 0
    inputs, weights = (np.asarray(a) for a in pretext.masked_patches(images, 0.3, patch_size=8, seed=3))
    assert weights.shape == (2, 36, 40) and 0.1 < weights.mean() < 0.5
    np.testing.assert_array_equal(inputs[..., 0] == 0, weights == 1)  # hidden pixels are 0, only they
    np.testing.assert_array_equal(inputs[weights == 0], images[weights == 0])
    for b in range(2):  # each 8 x 8 square of the grid (cut at the border) is hidden whole or not at all
        for y in range(0, 36, 8):
            for x in range(0, 40, 8):
                assert len(np.unique(weights[b, y:y + 8, x:x + 8])) == 1


def test_only_masked_pixels_enter_the_loss():
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    targets = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    weights = (rng.random((2, 16, 16)) < 0.05).astype(np.float32)
    weights[:, 0, 0] = 1.0
    loss = np.asarray(pretext.masked_mse(predictions, targets, weights))
    expected = [np.mean((predictions[b] - targets[b])[weights[b] == 1] ** 2) for b in range(2)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Changing every unmasked prediction and target leaves the loss as it was...
    unmasked = weights == 0
    other_predictions, other_targets = predictions.copy(), targets.copy()
    other_predictions[unmasked] += 100.0
    other_targets[unmasked] -= 50.0
    np.testing.assert_allclose(np.asarray(pretext.masked_mse(other_predictions, other_targets, weights)), loss,
                               rtol=1e-6)
    # ... and changing one masked prediction changes it.
    other_predictions[0, 0, 0, 0] += 1.0
    assert not np.isclose(float(pretext.masked_mse(other_predictions, other_targets, weights)[0]), loss[0])


# ---------------------------------------------------------------------------------------------
# The unlabelled database
# ---------------------------------------------------------------------------------------------

def test_unlabelled_database_holds_every_image_tiled_with_its_statistics_and_train_unet_refuses_it(
        data, tmp_path, capsys):
    import normalization

    metadata = records.read_metadata(str(data["unlabelled"]))
    assert metadata["unlabelled_only"] is True and metadata["split"] == "unlabelled"
    assert metadata["num_records"] == 6 * 4 and metadata["tile_size"] == 32  # 64 px images in 32 px tiles
    assert metadata["mask_folder"] is None and metadata["class_pixel_counts"] == [0]
    env = records.open_database(str(data["unlabelled"]))
    with env.begin() as txn:
        for index, source in enumerate(metadata["sources"]):
            record = records.decode(txn.get(records.record_key(index)))
            image = data["images"][os.path.basename(source["image"])[:-4]]
            y, x = source["tile"]
            np.testing.assert_array_equal(record.image[..., 0], image[y:y + 32, x:x + 32])
            assert not record.mask.any() and record.mask.shape == (32, 32)
            expected = normalization.channel_statistics(image[..., None])
            np.testing.assert_allclose(record.statistics.mean, expected.mean)
            np.testing.assert_allclose(record.statistics.std, expected.std)
    env.close()

    out = tmp_path / "refused"
    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        "--train_database", data["unlabelled"], "--test_database", data["labelled"][3], *TINY, "--output_dir", out])
    assert code == 2
    assert f"--train_database {data['unlabelled']} is an unlabelled database" in err and "pretrain_unet.py" in err
    assert not out.exists()

    with pytest.raises(build_lmdb.BuildError, match="--mask_folder is required"):
        build_lmdb.BuildConfig(image_folder="a", mask_folder=None, output_folder="o", dataset_name="x").validate()
    with pytest.raises(build_lmdb.BuildError, match="drop one of the two flags"):
        build_lmdb.BuildConfig(image_folder="a", mask_folder="m", output_folder="o", dataset_name="x",
                               unlabelled_only=True).validate()


# ---------------------------------------------------------------------------------------------
# Pretraining and fine-tuning
# ---------------------------------------------------------------------------------------------

def pretrain(data, out, *extra):
    """A tiny pretraining run: 3 test passes of 12 steps."""
    return pretrain_unet.main([str(a) for a in ["--database", data["unlabelled"], *TINY, "--output_dir", out,
                                                "--test_every_n_steps", 12, "--max_epochs", 3, "--learning_rate",
                                                0.01, "--test_crops", 8, *extra]])


@pytest.fixture(scope="module")
def pretrained(data):
    out = data["root"] / "pretrain"
    assert pretrain(data, out, "--mask_fraction", 0.05) == 0
    return out


@pytest.mark.parametrize("task", ["blind_spot", "masked_patch"])
def test_pretraining_loss_falls_on_a_tiny_synthetic_set(data, pretrained, tmp_path, task):
    out = pretrained
    if task != "blind_spot":
        out = tmp_path / task
        # 4 px squares inside the 8 px blocks: a hidden square's block is mostly visible around it.
        assert pretrain(data, out, "--pretext_task", task, "--patch_size", 4) == 0
    rows = read_csv(out / "test_metrics.csv")
    assert [int(r["step"]) for r in rows] == [12, 24, 36]
    losses = [float(r["loss"]) for r in rows]
    first_step = float(read_csv(out / "train_loss.csv")[0]["loss"])  # the untrained network's
    assert losses[-1] < losses[0] and losses[-1] < 0.7 * first_step, (first_step, losses)
    # Below the loss of the corrupted input itself: the network predicts more than it was shown.
    assert float(rows[-1]["loss_ratio"]) < 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["pretext"]["task"] == task and config["number_classes"] == 1  # a 1-channel head
    assert (out / "model.keras").exists()
    # inference.py and the export refuse it: it outputs images, not class logits.
    with pytest.raises(checkpoints.ModelLoadError, match="describes a pretraining run"):
        checkpoints.load_trained(str(out / "model.keras"))


def test_init_from_restores_every_non_head_weight_and_starts_a_fresh_head(data, pretrained, tmp_path, capsys):
    import keras

    # Learning rate 0 and no batch norm: the exported model holds the starting weights.
    finetune = ["--max_steps", 1, "--learning_rate", 0, "--lr_schedule", "constant", *TINY]
    code, out, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *finetune, "--output_dir", tmp_path / "tuned", "--init_from", pretrained])
    assert code == 0, err[-3000:]
    best = pretrained / "checkpoints" / "best"
    assert f"initialised from {best} (a blind_spot pretraining)" in out
    assert "not restored (fresh weights): logits\n" in out
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["init_from"] == str(pretrained) and config["init_from_checkpoint"] == str(best)

    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *finetune, "--output_dir", tmp_path / "scratch"])
    assert code == 0, err[-3000:]
    tuned = keras.saving.load_model(tmp_path / "tuned" / "model.keras")
    scratch = keras.saving.load_model(tmp_path / "scratch" / "model.keras")
    import models
    source = models.build_from_config(checkpoints.read_config(str(best)))
    source.load_weights(best / checkpoints.WEIGHTS_FILE)
    layers = [layer.name for layer in tuned.layers if layer.weights]
    assert "logits" in layers and len(layers) > 5
    for name in layers:
        expected = (scratch if name == "logits" else source).get_layer(name).get_weights()
        for got, want in zip(tuned.get_layer(name).get_weights(), expected):
            np.testing.assert_array_equal(got, want, err_msg=name)
    # The head is the scratch run's initialisation (2 classes), not the pretext head (1 channel).
    assert tuned.get_layer("logits").get_weights()[0].shape[-1] == 2

    # Resubmitted with the same command plus the restore flag, the run resumes from its own
    # checkpoint, not from the pretraining, and config.json still names where it began.
    code, out, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *finetune[2:], "--max_steps", 2, "--output_dir", tmp_path / "tuned",
        "--init_from", pretrained, "--restore_checkpoint_filepath", tmp_path / "tuned"])
    assert code == 0, err[-3000:]
    assert f"--init_from {pretrained} is not used: the run resumes from" in out and "initialised from" not in out
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["init_from_checkpoint"] == str(best)


@pytest.mark.parametrize("change, fragment", [
    (["--unet_depth", "3"], "unet_depth=2 but this run has unet_depth=3"),
    (["--base_filters", "8"], "base_filters=4 but this run has base_filters=8"),
    (["--channels", "2"], "input_channels=1 but this run has input_channels=2"),
])
def test_init_from_refuses_another_architecture_by_name_writing_nothing(data, pretrained, tmp_path, capsys,
                                                                       change, fragment):
    args = [*data["labelled"], *TINY, "--max_steps", 1]
    if change[0] == "--channels":
        make_synthetic_db(tmp_path / "train2", num_records=2, shape=(64, 64), channels=2)
        make_synthetic_db(tmp_path / "test2", num_records=1, shape=(64, 64), channels=2)
        args[:4] = ["--train_database", tmp_path / "train2", "--test_database", tmp_path / "test2"]
    else:
        args += change
    out = tmp_path / "refused"
    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys,
                            [*args, "--output_dir", out, "--init_from", pretrained])
    assert code == 2
    assert f"--init_from {pretrained / 'checkpoints' / 'best'} was trained with" in err and fragment in err
    assert not out.exists()


def test_pretraining_resumes_after_sigterm_like_training(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--database", data["unlabelled"], *TINY, "--output_dir", out, "--test_every_n_steps", 2,
            "--max_epochs", 2, "--test_crops", 2]
    original = trainer.Run.train_one_step

    def train_then_signal(self, state):
        done = original(self, state)
        if state.step == 3:  # mid-epoch, after the first test pass
            os.kill(os.getpid(), signal.SIGTERM)
        return done

    monkeypatch.setattr(trainer.Run, "train_one_step", train_then_signal)
    code, stdout, _ = run_main(pretrain_unet.main, capsys, args)
    monkeypatch.undo()
    assert code == 143 and f"resume with --restore_checkpoint_filepath {out}" in stdout
    assert json.loads((out / "checkpoints" / "latest" / "state.json").read_text())["step"] == 3
    assert not (out / "model.keras").exists()

    code, stdout, err = run_main(pretrain_unet.main, capsys, [*args, "--restore_checkpoint_filepath", out])
    assert code == 0, err[-3000:]
    assert "resumed from" in stdout and "step 3, epoch 1" in stdout
    assert [(r["epoch"], r["step"]) for r in read_csv(out / "test_metrics.csv")] == [("1", "2"), ("2", "4")]
    assert [r["step"] for r in read_csv(out / "train_loss.csv")] == ["1", "2", "3", "4"]
    assert (out / "model.keras").exists()


def test_init_from_gives_the_network_flags_left_unset_and_the_planner_leaves_them(data, pretrained, tmp_path,
                                                                                   capsys):
    # Width and depth not given: taken from the pretrained network, not from the defaults (which it
    # would refuse) nor from a --time_budget plan (which could halve the width and restore nothing).
    given = dict(zip(TINY[::2], TINY[1::2]))
    unset = [a for flag, value in given.items() if flag not in ("--base_filters", "--unet_depth")
             for a in (flag, value)]
    code, out, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *unset, "--max_steps", 1, "--output_dir", tmp_path / "tuned", "--init_from", pretrained])
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (config["base_filters"], config["unet_depth"]) == (4, 2)
    assert "not restored (fresh weights): logits\n" in out
    planned = trainer.TrainConfig(model="unet", train_database="t", test_database="t", output_dir="o", time_budget="1h",
                                  self_configure=["tile_size", "base_filters", "unet_depth", "batch_size"])
    fixed = checkpoints.network_of_weights(planned, {"base_filters": 4})  # written before --unet_depth: 4
    assert (fixed.base_filters, fixed.unet_depth, fixed.self_configure) == (4, 4, ["tile_size", "batch_size"])


def test_a_pretraining_checkpoint_is_not_resumed_as_segmentation_nor_the_reverse(data, pretrained, tmp_path,
                                                                                  capsys):
    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *TINY, "--max_steps", 1, "--output_dir", tmp_path / "seg",
        "--restore_checkpoint_filepath", pretrained])
    assert code == 2 and "is a pretraining checkpoint (pretrain_unet.py): start a segmentation run from it " \
                         "with --init_from" in err
    assert not (tmp_path / "seg").exists()
    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *TINY, "--max_steps", 1, "--output_dir", tmp_path / "seg"])
    assert code == 0, err[-3000:]
    code, _, err = run_main(pretrain_unet.main, capsys, [
        "--database", data["unlabelled"], *TINY, "--max_steps", 1, "--output_dir", tmp_path / "pre",
        "--restore_checkpoint_filepath", tmp_path / "seg"])
    assert code == 2 and "is a segmentation run's checkpoint: pretrain_unet.py resumes pretraining runs only" in err
    assert not (tmp_path / "pre").exists()


def test_resuming_a_pretraining_with_other_pretext_settings_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--database", data["unlabelled"], *TINY, "--output_dir", out, "--test_every_n_steps", 1,
            "--test_crops", 2]
    code, _, err = run_main(pretrain_unet.main, capsys, [*args, "--max_steps", 1])
    assert code == 0, err[-3000:]
    before = (out / "test_metrics.csv").read_text()
    code, _, err = run_main(pretrain_unet.main, capsys, [*args, "--max_steps", 2, "--pretext_task", "masked_patch",
                                                         "--restore_checkpoint_filepath", out])
    assert code == 2
    assert "was pretrained with other settings (--pretext_task blind_spot -> masked_patch, --mask_fraction " \
           "0.015 -> 0.25)" in err
    assert (out / "test_metrics.csv").read_text() == before


def test_a_labelled_or_sparse_database_pretrains_with_its_masks_ignored(data, tmp_path, capsys):
    import imagereader

    # Labels 0 and 1 in a 1-channel database: the pretext head has 1 output, and that is no refusal.
    code, _, err = run_main(pretrain_unet.main, capsys, [
        "--database", data["root"] / "train", *TINY, "--max_steps", 1, "--test_crops", 2,
        "--output_dir", tmp_path / "pre"])
    assert code == 0, err[-3000:]
    # A sparse database: every pixel is a pretext pixel, none is ignored for its missing label.
    mask = np.full((64, 64), -1, np.int8)
    mask[10:12, :] = 1
    records.write_database(str(tmp_path / "sparse"), iter([(np.ones((64, 64), np.uint16), mask,
                                                            {"image": "a.tif", "mask": "a.tif"})]),
                           {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    with imagereader.ImageReader(str(tmp_path / "sparse"), 2, use_augmentation=False, tile_size=32,
                                 use_masks=False) as reader:
        _, masks = reader.get_batch()
    assert masks.shape == (2, 32, 32) and np.all(masks == 0)


@pytest.mark.parametrize("damaged, fragment", [
    (checkpoints.WEIGHTS_FILE, "cannot load these weights"),
    ("config.json", "cannot read this checkpoint file (JSONDecodeError"),
    ("state.json", "cannot read this checkpoint file (JSONDecodeError"),
    ("optimizer.npz", "cannot read this checkpoint file"),
])
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_written(data, pretrained, tmp_path, capsys, damaged,
                                                                   fragment):
    import shutil

    source = tmp_path / "copy"
    shutil.copytree(pretrained, source)
    path = source / "checkpoints" / "latest" / damaged
    path.write_bytes(path.read_bytes()[:40])  # cut short, as by a full disk
    before = sorted(p.name for p in source.iterdir())
    flag = "--init_from" if damaged in (checkpoints.WEIGHTS_FILE, "config.json") else None
    runs = [(pretrain_unet.main, ["--database", data["unlabelled"], *TINY, "--max_steps", 40, "--output_dir", source,
                                  "--mask_fraction", 0.05, "--test_crops", 8,  # the pretraining's own settings
                                  "--restore_checkpoint_filepath", source / "checkpoints" / "latest"])]
    if flag:
        runs.append((lambda a: trainer.main("unet", a),
                     [*data["labelled"], *TINY, "--max_steps", 1, "--output_dir", tmp_path / "tuned",
                      "--init_from", source / "checkpoints" / "latest"]))
    for main, args in runs:
        code, _, err = run_main(main, capsys, args)
        assert code == 2, err[-3000:]
        assert f"{path}: {fragment}" in err
    assert sorted(p.name for p in source.iterdir()) == before and not (tmp_path / "tuned").exists()


def test_a_blind_spot_window_wider_than_the_tile_is_refused(data, tmp_path, capsys):
    code, _, err = run_main(pretrain_unet.main, capsys, [
        "--database", data["unlabelled"], "--tile_size", 8, "--unet_depth", 2, "--base_filters", 2,
        "--neighbour_radius", 8, "--max_steps", 1, "--output_dir", tmp_path / "r8"])
    assert code == 2 and "--neighbour_radius 8: must be smaller than --tile_size 8" in err
    assert not (tmp_path / "r8").exists()


def test_a_resumed_or_fine_tuned_run_takes_width_and_depth_from_its_checkpoint(data, tmp_path, capsys):
    given = dict(zip(TINY[::2], TINY[1::2]))
    unset = [a for flag, value in given.items() if flag not in ("--base_filters", "--unet_depth")
             for a in (flag, value)]
    out = tmp_path / "run"
    code, _, err = run_main(lambda a: trainer.main("unet", a), capsys,
                            [*data["labelled"], *TINY, "--max_steps", 1, "--output_dir", out])
    assert code == 0, err[-3000:]
    # Resubmitted without the network flags: resumed at 4 filters, depth 2 (not refused for the defaults).
    code, out_text, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        *data["labelled"], *unset, "--max_steps", 2, "--output_dir", out, "--restore_checkpoint_filepath", out])
    assert code == 0, err[-3000:]
    assert "resumed from" in out_text
    # Fine-tuned on another database, likewise.
    make_synthetic_db(tmp_path / "other", num_records=4, shape=(64, 64), seed=7)
    code, out_text, err = run_main(lambda a: trainer.main("unet", a), capsys, [
        "--train_database", tmp_path / "other", *data["labelled"][2:], *unset, "--max_steps", 1,
        "--output_dir", tmp_path / "tuned", "--restore_checkpoint_filepath", out])
    assert code == 0, err[-3000:]
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (config["base_filters"], config["unet_depth"]) == (4, 2)
    assert "fine-tuning from" in out_text
