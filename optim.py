"""Optimizers and learning-rate schedules.

    learning_rate_at(step, ...)      the schedule: a plain function of the trainer's step
    make_optimizer(settings)         Keras optimizer with a learning-rate variable (the only place
                                     optimizers are made; steps.make_optimizer and the trainer come
                                     here through train_config.optimizer_settings)
    set_step(optimizer, settings, step)  its rate for the update after ``step`` trainer steps
    current_learning_rate(optimizer) the rate of its next update

The schedule is driven by the trainer's step (TrainState.step, saved in every checkpoint), set
before every update, not by the optimizer's own counter: under --mixed_precision float16 the
loss-scale optimizer skips the inner optimizer's update (and its ``iterations``) on every step
whose gradients overflowed, so a schedule of ``iterations`` would lag behind the run and never
reach its last value at --max_steps. A resumed run continues at exactly the rate an uninterrupted
run has at that step: nothing re-derives it from flags or wall time, which is how peers get "the LR
restarts from warm-up after a resume" bugs.
"""
import dataclasses
import math

import distribute

SCHEDULES = ("constant", "cosine", "poly")
OPTIMIZERS = ("adam", "adamw", "sgd")
POLY_EXPONENT = 0.9  # nnU-Net's poly decay


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What make_optimizer needs, as plain values (see train_config for the flags)."""
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = None  # needed by cosine and poly
    weight_decay: float = 0.0
    momentum: float = 0.99
    nesterov: bool = True
    mixed_precision: str = None  # None, "float16" or "bfloat16"


def learning_rate_at(step, base, schedule="constant", warmup_steps=0, total_steps=None):
    """Learning rate of the update that follows ``step`` completed steps (step 0 = first update).

    Linear warm-up from base / warmup_steps to base over the first ``warmup_steps`` updates, then
    constant, cosine decay to 0, or poly decay (1 - t)^0.9 to 0 over the remaining steps up to
    ``total_steps``; beyond ``total_steps`` the decayed schedules stay at 0.
    """
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return base * (1.0 - progress) ** POLY_EXPONENT
    raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")


def check_settings(settings):
    """ValueError naming the flag for settings no optimizer can use."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {settings.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if settings.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr_schedule {settings.lr_schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if settings.warmup_steps < 0:
        raise ValueError(f"--warmup_steps {settings.warmup_steps}: expected an integer >= 0")
    if settings.lr_schedule != "constant" and not settings.total_steps:
        raise ValueError(f"--lr_schedule {settings.lr_schedule} decays over the run, so it needs the run "
                         "length: give --max_steps, or --max_epochs (x steps per epoch)")
    if settings.total_steps and settings.warmup_steps >= settings.total_steps:
        raise ValueError(f"--warmup_steps {settings.warmup_steps} must be smaller than the run length "
                         f"({settings.total_steps} steps)")
    if not (settings.weight_decay >= 0 and math.isfinite(settings.weight_decay)):
        raise ValueError(f"--weight_decay {settings.weight_decay}: expected a finite number >= 0")
    if settings.weight_decay and settings.optimizer == "adam":
        raise ValueError("--weight_decay needs --optimizer adamw or sgd (Adam's L2 penalty is not "
                         "decoupled weight decay; use adamw)")
    if not 0 <= settings.momentum < 1:
        raise ValueError(f"--momentum {settings.momentum}: expected a value in [0, 1)")


def make_optimizer(settings):
    """The Keras optimizer of ``settings`` (created under the strategy's scope by the caller).

    float16 needs dynamic loss scaling (its range ends at 65504, small gradients underflow), so it is
    wrapped in a LossScaleOptimizer whose skip decision all replicas share; bfloat16 has float32's
    range and needs none. Names are explicit and differ per optimizer: checkpoints key optimizer
    variables by their paths (see checkpoints.optimizer_arrays), so Adam, AdamW and SGD state never
    collide and resuming with another --optimizer is refused by name.
    """
    import keras

    check_settings(settings)
    # A plain rate (a variable), set_step moves it along the schedule; it starts at the first
    # update's rate so an optimizer nobody steps uses the schedule's step 0.
    rate = learning_rate_at(0, settings.learning_rate, settings.lr_schedule, settings.warmup_steps,
                            settings.total_steps)
    if settings.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=rate, name="adam")
    elif settings.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=rate, weight_decay=settings.weight_decay, name="adamw")
    else:
        optimizer = keras.optimizers.SGD(learning_rate=rate, momentum=settings.momentum,
                                         nesterov=settings.nesterov,
                                         weight_decay=settings.weight_decay or None, name="sgd")
    if settings.mixed_precision == "float16":
        optimizer = _agreed_loss_scale_optimizer_class()(optimizer, name="loss_scale_optimizer")
    return optimizer


def _agreed_loss_scale_optimizer_class():
    """keras.optimizers.LossScaleOptimizer whose skip/apply decision is the same on every replica.

    Keras checks each tower's own, not yet summed gradients for inf/NaN and (in Keras 3.15) lets
    each replica act on its own answer: when only one tower overflowed, the others applied a step
    whose all-reduced gradients were not finite, and the loss scale was not lowered; with several
    workers, one worker would skip while the others waited for it in the all-reduce. Combining the
    flag over every replica of every worker first makes all of them skip (and halve the scale)
    together.
    """
    import keras

    class AgreedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
        def check_finite(self, grads):
            return distribute.all_replicas_true(super().check_finite(grads))

    return AgreedLossScaleOptimizer


def set_step(optimizer, settings, step):
    """Set the rate of ``optimizer``'s next update to the schedule's value after ``step`` completed
    trainer steps (learning_rate_at). Called before every update: skipped float16 updates count."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.learning_rate = learning_rate_at(step, settings.learning_rate, settings.lr_schedule,
                                           settings.warmup_steps, settings.total_steps)


def current_learning_rate(optimizer):
    """The learning rate the next update of ``optimizer`` uses, as a float."""
    import keras

    # convert_to_numpy also reads the variable under a tf.distribute strategy (a MirroredVariable
    # has no float()).
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))
