"""optim.py: schedule values at given steps; the Keras schedule equals the plain function; a
restored optimizer continues at the uninterrupted learning rate."""
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
def test_keras_schedule_matches_and_resume_continues_exactly(schedule):
    import keras

    settings = optim.OptimizerSettings(optimizer="sgd", learning_rate=0.1, lr_schedule=schedule,
                                       warmup_steps=3, total_steps=20)
    weights = keras.Variable(np.ones(4, np.float32))

    def run(optimizer, steps):
        rates = []
        for _ in range(steps):
            rates.append(optim.current_learning_rate(optimizer))
            optimizer.apply([keras.ops.ones(4)], [weights])
        return rates

    uninterrupted = optim.make_optimizer(settings)
    uninterrupted.build([weights])
    rates = run(uninterrupted, 12)
    expected = [optim.learning_rate_at(s, 0.1, schedule, 3, 20) for s in range(12)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)

    # "Resume": a fresh optimizer gets the saved variables (iterations among them) after 7 steps.
    first = optim.make_optimizer(settings)
    first.build([weights])
    run(first, 7)
    saved = [np.array(v.numpy()) for v in first.variables]
    resumed = optim.make_optimizer(settings)
    resumed.build([weights])
    for variable, value in zip(resumed.variables, saved):
        variable.assign(value)
    np.testing.assert_allclose(run(resumed, 5), expected[7:], rtol=1e-6)


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
    assert type(scaled).__name__ == "LossScaleOptimizer"
