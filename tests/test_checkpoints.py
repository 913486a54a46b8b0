"""checkpoints.py: optimizer state keyed by variable name, the one checkpoint lookup (latest or best
first, .old fallbacks), atomic saves, and the exported model.keras."""
import json

import keras
import numpy as np
import pytest

import checkpoints
import image_io
import models
from checkpoints import TrainState
from errors import InferenceError, TrainingError

CONFIG = {"model": "unet", "number_classes": 2, "input_channels": 1, "base_filters": 2, "batch_norm": True}


def _trained_pair(optimizer=None, seed=0):
    """A tiny UNet and an optimizer that took one step, so its moments are not zero."""
    keras.utils.set_random_seed(seed)
    model = models.build_from_config(CONFIG)
    optimizer = optimizer or keras.optimizers.Adam(1e-3, name="adam")
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    optimizer.apply([rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables],
                    model.trainable_variables)
    return model, optimizer


def _save(directory, model, optimizer, step=1):
    checkpoints.save_checkpoint(str(directory), model, optimizer, TrainState(step=step), CONFIG)


def test_optimizer_state_is_keyed_by_variable_name(tmp_path):
    model, optimizer = _trained_pair()
    _save(tmp_path / "latest", model, optimizer)
    with np.load(tmp_path / "latest" / "optimizer.npz") as saved:
        keys = list(saved.files)
    assert "Adam/enc1_conv1_kernel_momentum" in keys and "Adam/iteration" in keys
    # Restore into an optimizer whose variables come in another order and whose name is not "adam"
    # (Keras numbers the names of later instances): every array still lands on the variable of the
    # same name.
    fresh = keras.optimizers.Adam(1e-3, name="adam_7")
    fresh.build(list(reversed(models.build_from_config(CONFIG).trainable_variables)))
    checkpoints.load_optimizer(str(tmp_path / "latest" / "optimizer.npz"), fresh)
    expected = checkpoints.optimizer_arrays(optimizer)
    restored = checkpoints.optimizer_arrays(fresh)
    assert restored.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(restored[key], expected[key], err_msg=key)
    assert np.abs(restored["Adam/enc1_conv1_kernel_momentum"]).max() > 0


def test_optimizer_mismatch_fails_naming_the_variables_and_assigns_nothing(tmp_path):
    model, optimizer = _trained_pair()
    _save(tmp_path / "latest", model, optimizer)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3, name="adam"))
    scaled.build(model.trainable_variables)
    before = checkpoints.optimizer_arrays(scaled)
    with pytest.raises(TrainingError, match=r"optimizer.npz does not match this optimizer: variables 4 missing "
                                            r"from the file \(e\.g\. LossScaleOptimizer/.*--mixed_precision"):
        checkpoints.load_optimizer(str(tmp_path / "latest" / "optimizer.npz"), scaled)
    after = checkpoints.optimizer_arrays(scaled)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_positional_optimizer_files_of_earlier_versions_still_load(tmp_path):
    model, optimizer = _trained_pair()
    np.savez(tmp_path / "optimizer.npz", *[np.asarray(v.numpy()) for v in optimizer.variables])
    fresh = keras.optimizers.Adam(1e-3, name="adam")
    fresh.build(model.trainable_variables)
    checkpoints.load_optimizer(str(tmp_path / "optimizer.npz"), fresh)
    for a, b in zip(fresh.variables, optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_find_checkpoint_prefers_latest_or_best_and_falls_back_to_old_copies(tmp_path):
    def make(folder):
        folder.mkdir(parents=True)
        for name in checkpoints.CHECKPOINT_FILES:
            (folder / name).write_text("{}")
        return str(folder)

    out = tmp_path / "run"
    assert checkpoints.find_checkpoint(str(out)) is None
    best = make(out / "checkpoints" / "best")
    assert checkpoints.find_checkpoint(str(out)) == best            # no latest: the other one
    latest = make(out / "checkpoints" / "latest")
    assert checkpoints.find_checkpoint(str(out)) == latest
    assert checkpoints.find_checkpoint(str(out), prefer="best") == best
    assert checkpoints.find_checkpoint(latest) == latest            # a checkpoint folder itself
    # A kill between save_checkpoint's two renames leaves only the ".old" scratch of latest
    # (.latest.<host>-<pid>.old; .latest.old from versions before the scratch names).
    for old in (image_io.scratch_path(latest, "old"), out / "checkpoints" / ".latest.old"):
        (out / "checkpoints" / "latest").rename(old)
        assert checkpoints.find_checkpoint(str(out)) == str(old)
        assert checkpoints.find_checkpoint(latest) == str(old)
        old.rename(out / "checkpoints" / "latest")
    (out / "checkpoints" / "latest").rename(out / "checkpoints" / ".latest.old")
    # Inference needs the weights only.
    (out / "checkpoints" / "best" / "state.json").unlink()
    assert checkpoints.find_checkpoint(str(out), prefer="best", required=("model.weights.h5",)) == best


def test_save_replaces_atomically_and_export_uses_best_and_names_the_model(tmp_path):
    out = tmp_path / "run"
    best_model, best_optimizer = _trained_pair(seed=1)
    _save(out / "checkpoints" / "best", best_model, best_optimizer, step=3)
    later_model, later_optimizer = _trained_pair(seed=2)
    for step in (4, 5):  # the second save replaces the first
        _save(out / "checkpoints" / "latest", later_model, later_optimizer, step=step)
    assert json.loads((out / "checkpoints" / "latest" / "state.json").read_text())["step"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "latest"]  # no scratch left

    path = checkpoints.export_model(str(out), CONFIG)
    exported = keras.saving.load_model(path)
    assert exported.name == "unet"
    for a, b in zip(exported.get_weights(), best_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not list(out.glob(".model*"))


def test_inference_reads_the_model_name_not_the_layers(tmp_path):
    model = models.build_from_config(dict(CONFIG, model="segnet"))
    renamed = keras.Model(model.inputs, model.outputs, name="my_net")  # a SegNet under another name
    renamed.save(tmp_path / "model.keras")
    with pytest.raises(InferenceError, match=r"cannot tell which model .*model.keras is.*'my_net' is "
                                             r"not one of unet, segnet.*config.json"):
        checkpoints.load_model(model=str(tmp_path / "model.keras"))
    model.save(tmp_path / "model.keras")  # the builder's own name says which model it is
    loaded = checkpoints.load_model(model=str(tmp_path / "model.keras"))
    assert loaded.name == "segnet"


def test_a_best_left_behind_by_a_kill_between_latest_and_best_is_completed_on_resume(tmp_path, capsys):
    # A kill after checkpoints/latest of epoch 2 (its best) and before checkpoints/best: best still
    # holds epoch 1, which the export and --init_from would have used.
    model, optimizer = _trained_pair(seed=0)
    root = tmp_path / "run" / "checkpoints"
    checkpoints.save_checkpoint(str(root / "best"), model, optimizer,
                                TrainState(step=4, epoch=1, best_loss=0.36, best_epoch=1), CONFIG)
    model, optimizer = _trained_pair(seed=1)
    latest = TrainState(step=8, epoch=2, best_loss=0.35, best_epoch=2)
    checkpoints.save_checkpoint(str(root / "latest"), model, optimizer, latest, CONFIG)

    assert checkpoints.complete_best(str(root / "latest"), latest)
    assert json.loads((root / "best" / "state.json").read_text())["epoch"] == 2
    assert (root / "best" / checkpoints.WEIGHTS_FILE).read_bytes() == \
        (root / "latest" / checkpoints.WEIGHTS_FILE).read_bytes()
    assert "replaced by a copy of" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest"]
    # Consistent now, or latest not the best pass, or a checkpoint folder given itself: nothing to do.
    assert not checkpoints.complete_best(str(root / "latest"), latest)
    later = TrainState(step=12, epoch=3, best_loss=0.35, best_epoch=2)
    assert not checkpoints.complete_best(str(root / "latest"), later)
    assert not checkpoints.complete_best(str(root / "best"), latest)
