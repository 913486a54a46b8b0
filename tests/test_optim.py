"""optim.py: schedule values at given steps; an update uses the rate of the trainer step set; a
restored run continues at the uninterrupted learning rate."""
import math

import numpy as np
import pytest

import optim


def test_schedule_values_at_given_steps():
    at = optim.learning_rate_at
    assert at(0, 1.0, "constant") == 1.0 and at(500, 1.0, "constant") == 1.0
    assert [at(s, 1.0, "constant", warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert at(10, 2.0, "cosine", 10, 110) == 2.0
    assert math.isclose(at(60, 2.0, "cosine", 10, 110), 1.0)
    assert at(110, 2.0, "cosine", 10, 110) == 0.0 and at(500, 2.0, "cosine", 10, 110) == 0.0
    assert math.isclose(at(50, 1.0, "poly", 0, 100), 0.5 ** 0.9)
    assert at(100, 1.0, "poly", 0, 100) == 0.0


@pytest.mark.parametrize("schedule", ["constant", "cosine", "poly"])
def test_updates_use_the_rate_of_the_step_set(schedule):
    import keras

    # SGD without momentum and a unit gradient: each update moves the weights by exactly its rate.
    settings = optim.OptimizerSettings(optimizer="sgd", learning_rate=0.1, lr_schedule=schedule,
                                       warmup_steps=3, total_steps=20, momentum=0.0)
    weights = keras.Variable(np.zeros(4, np.float32))
    optimizer = optim.make_optimizer(settings)
    optimizer.build([weights])
    expected = [optim.learning_rate_at(s, 0.1, schedule, 3, 20) for s in range(20)]
    assert optim.current_learning_rate(optimizer) == pytest.approx(expected[0])  # never stepped: step 0
    # Steps in any order (a resumed run starts at its saved step): the rate is that of the step.
    for step in (7, 8, 19, 0, 12):
        optim.set_step(optimizer, settings, step)
        assert optim.current_learning_rate(optimizer) == pytest.approx(expected[step], rel=1e-6)
        before = weights.numpy().copy()
        optimizer.apply([keras.ops.ones(4)], [weights])
        np.testing.assert_allclose(before - weights.numpy(), expected[step], rtol=1e-5)


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--max_steps"):
        optim.check_settings(optim.OptimizerSettings(lr_schedule="cosine"))
    with pytest.raises(ValueError, match="--weight_decay .*adamw"):
        optim.check_settings(optim.OptimizerSettings(weight_decay=1e-4))
    with pytest.raises(ValueError, match="--warmup_steps"):
        optim.check_settings(optim.OptimizerSettings(lr_schedule="poly", warmup_steps=50, total_steps=50))


def test_adamw_and_sgd_are_built_with_their_settings():
    adamw = optim.make_optimizer(optim.OptimizerSettings(optimizer="adamw", weight_decay=0.01))
    assert type(adamw).__name__ == "AdamW" and math.isclose(adamw.weight_decay, 0.01)
    sgd = optim.make_optimizer(optim.OptimizerSettings(optimizer="sgd", momentum=0.9, nesterov=True))
    assert type(sgd).__name__ == "SGD" and sgd.nesterov and math.isclose(sgd.momentum, 0.9)
    scaled = optim.make_optimizer(optim.OptimizerSettings(mixed_precision="float16"))
    # float16: the loss-scale wrapper whose skip decision every replica shares.
    assert type(scaled).__name__ == "AgreedLossScaleOptimizer" and scaled.name == "loss_scale_optimizer"
    assert [o.name for o in (adamw, sgd, scaled.inner_optimizer)] == ["adamw", "sgd", "adam"]


# ---------------------------------------------------------------------------------------------
# The trainer: the learning rate it logs, --max_steps, resume, early stopping with a schedule
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    from conftest import make_synthetic_db

    root = tmp_path_factory.mktemp("dbs")
    make_synthetic_db(root / "train", num_records=8, shape=(32, 32), seed=0)
    make_synthetic_db(root / "test", num_records=2, shape=(32, 32), seed=1)
    return str(root / "train"), str(root / "test")


def _config(dbs, output_dir, **overrides):
    import trainer

    values = dict(batch_size=2, tile_size=32, base_filters=2, unet_depth=2, test_every_n_steps=3, log_every_n_steps=1,
                  use_augmentation=False, learning_rate=0.01, optimizer="sgd", lr_schedule="poly",
                  warmup_steps=2, max_steps=8)
    values.update(overrides)
    return trainer.TrainConfig("unet", dbs[0], dbs[1], str(output_dir), **values)


def _logged_rates(text):
    """{step: lr} from the trainer's progress lines."""
    return {int(line.split()[1]): float(line.split()[5]) for line in text.splitlines()
            if line.startswith("step ") and line.split()[4] == "lr"}


def test_a_resumed_run_logs_the_learning_rate_of_an_uninterrupted_one(dbs, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import trainer

    whole = trainer.train(_config(dbs, tmp_path / "whole"))
    # --max_steps 8 with 3 steps per epoch: passes after steps 3, 6 and a last one at 8.
    assert (whole["exit_code"], whole["stop_reason"], whole["step"], whole["epoch"]) == (0, "max_steps", 8, 3)
    rates = _logged_rates(capsys.readouterr().out)
    # The rate logged at step s is the one its update used: learning_rate_at(s - 1).
    expected = {s: optim.learning_rate_at(s - 1, 0.01, "poly", 2, 8) for s in range(1, 9)}
    assert sorted(rates) == list(range(1, 9))
    np.testing.assert_allclose([rates[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5)
    assert rates[1] == pytest.approx(0.005) and rates[3] == pytest.approx(0.01) and rates[8] < rates[4]

    # Stopped by a real SIGTERM after step 4 (mid-epoch), then resumed with the same flags.
    original = trainer.Run.train_one_step

    def train_then_signal(self, state):
        done = original(self, state)
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return done

    monkeypatch.setattr(trainer.Run, "train_one_step", train_then_signal)
    stopped = trainer.train(_config(dbs, tmp_path / "split"))
    monkeypatch.undo()
    assert (stopped["exit_code"], stopped["step"]) == (143, 4)
    capsys.readouterr()
    resumed = trainer.train(_config(dbs, tmp_path / "split", restore_checkpoint_filepath=str(tmp_path / "split")))
    assert (resumed["exit_code"], resumed["step"], resumed["epoch"]) == (0, 8, 3)
    after = _logged_rates(capsys.readouterr().out)
    assert sorted(after) == [5, 6, 7, 8]
    np.testing.assert_allclose([after[s] for s in after], [rates[s] for s in after], rtol=1e-5)

    # A finished run resumed again trains nothing and runs no further test pass.
    again = trainer.train(_config(dbs, tmp_path / "split", restore_checkpoint_filepath=str(tmp_path / "split")))
    assert (again["stop_reason"], again["step"], again["epoch"]) == ("max_steps", 8, 3)


def test_early_stopping_still_ends_a_scheduled_run(dbs, tmp_path):
    import trainer

    # Learning rate 0 and no batch norm: the test loss never changes, so it never improves after the
    # first pass, and early stopping must end the run long before --max_steps.
    summary = trainer.train(_config(dbs, tmp_path / "run", learning_rate=0.0, batch_norm=False,
                                    early_stopping=2, max_steps=300, log_every_n_steps=100))
    assert (summary["stop_reason"], summary["epoch"], summary["step"]) == ("early_stopping", 3, 9)


def test_a_schedule_needs_a_run_length_and_a_warmup_inside_it(dbs, tmp_path):
    import trainer
    from errors import ConfigError

    with pytest.raises(ConfigError, match="--lr_schedule cosine decays over the run.*--max_steps"):
        trainer.train(_config(dbs, tmp_path / "a", lr_schedule="cosine", max_steps=None))
    # --max_epochs 1 x 3 steps per epoch is the run length: a warm-up of 3 does not fit in it.
    with pytest.raises(ConfigError, match=r"--warmup_steps 3 must be smaller than the run length \(3 steps\)"):
        trainer.train(_config(dbs, tmp_path / "b", max_steps=None, max_epochs=1, warmup_steps=3))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_current_learning_rate_reads_a_distributed_optimizer():
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])  # what --gpus none builds
    with strategy.scope():
        weights = keras.Variable(np.ones(3, np.float32))
        constant = optim.make_optimizer(optim.OptimizerSettings(learning_rate=0.25))
        scheduled = optim.make_optimizer(optim.OptimizerSettings(learning_rate=0.5, lr_schedule="cosine",
                                                                 warmup_steps=2, total_steps=10))
        for optimizer in (constant, scheduled):
            optimizer.build([weights])
    assert optim.current_learning_rate(constant) == 0.25
    assert optim.current_learning_rate(scheduled) == pytest.approx(0.25)  # first warm-up step: 0.5 / 2
