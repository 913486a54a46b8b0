"""Checks of the distributed train step that need their own processes: logical devices can only be
configured once per process, and each TensorFlow start costs seconds.

    python tests/distributed_checks.py towers           two logical CPU towers (tests/test_distribute.py)
    python tests/distributed_checks.py worker_overflow  one of two TF_CONFIG workers (tests/test_multiworker.py)

Each prints one line "RESULT <json>".
"""
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import distribute  # noqa: E402


def model_and_step(towers, reduce_to, learning_rate=0.5, jit_compile=False):
    import keras

    import models
    import steps

    strategy = distribute.build_strategy(towers, reduce_to)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = models.build_model("unet", 3, input_channels=1, base_filters=2, unet_depth=2, batch_norm=False)
        optimizer = keras.optimizers.SGD(learning_rate)   # SGD: the update is proportional to the gradient
        optimizer.build(model.trainable_variables)
    step = steps.make_train_step(strategy, model, optimizer, "ce+dice", 3, global_batch_size=4,
                                 jit_compile=jit_compile)
    return strategy, model, step


def split(images, masks):
    """One half of the batch per tower."""
    return [(images[:2], masks[:2]), (images[2:], masks[2:])]


def tower_equivalence(towers, images, masks):
    import tensorflow as tf

    import steps

    two, model2, step2 = model_and_step(towers, "/cpu:0")
    one, model1, step1 = model_and_step(["/cpu:0"], "/cpu:0")
    model1.set_weights(model2.get_weights())
    initial = [w.copy() for w in model2.get_weights()]
    expected_loss = float(tf.reduce_mean(steps.per_image_loss(model1(images), masks, "ce+dice", 3)))
    loss2 = float(step2(distribute.distribute_batches(two, split(images, masks))))
    loss1 = float(step1(distribute.distribute_batches(one, [(images, masks)])))
    w1, w2 = model1.get_weights(), model2.get_weights()
    return {"loss_one": loss1, "loss_two": loss2, "expected_loss": expected_loss,
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)),
            "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, initial))}


def reduction_devices(towers, images, masks, reduce_to, jit_compile=False):
    """{device: count} of the AddN ops summing values from both towers, and the variable count."""
    import tensorflow as tf

    strategy, model, step = model_and_step(towers, reduce_to, jit_compile=jit_compile)
    batch = distribute.distribute_batches(strategy, split(images, masks))
    graph = step.get_concrete_function(batch).graph
    found = []
    for op in graph.get_operations():
        if op.type != "AddN":
            continue
        input_devices = {tf.DeviceSpec.from_string(t.op.device or "/cpu:0").device_index for t in op.inputs}
        if input_devices == {0, 1}:                    # sums values coming from both towers
            spec = tf.DeviceSpec.from_string(op.device)
            found.append(f"{spec.device_type}:{spec.device_index}")
    return {d: found.count(d) for d in set(found)}, len(model.trainable_variables)


def batch_norm_sync(towers, images, masks):
    """BatchNormalization moving statistics: per tower after a step, averaged by make_sync_statistics."""
    import keras

    import models
    import steps

    strategy = distribute.build_strategy(towers, "/cpu:0")
    with strategy.scope():
        model = models.build_model("unet", 2, input_channels=1, base_filters=2, unet_depth=2, batch_norm=True)
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    step = steps.make_train_step(strategy, model, optimizer, "ce", 2, global_batch_size=4)
    step(distribute.distribute_batches(strategy, [(images[:2], masks[:2] % 2), (images[2:] * 5 + 3, masks[2:] % 2)]))
    moving = model.non_trainable_variables
    before = [[np.array(t) for t in strategy.experimental_local_results(v.value)] for v in moving]
    distribute.make_sync_statistics(strategy, moving)()
    after = [[np.array(t) for t in strategy.experimental_local_results(v.value)] for v in moving]
    return {"bn_differed_before": any(not np.allclose(a, b) for a, b in before),
            "bn_max_error_after": max(float(np.max(np.abs(x - (a + b) / 2)))
                                      for (a, b), pair in zip(before, after) for x in pair)}


def float16_model(strategy):
    """A tiny UNet and the trainer's --mixed_precision float16 optimizer, built under ``strategy``
    (the global policy must be mixed_float16)."""
    import keras

    import models
    import optim
    import train_config

    config = train_config.TrainConfig("unet", "", "", "", learning_rate=1e-3, mixed_precision="float16")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = models.build_model("unet", 2, input_channels=1, base_filters=2, unet_depth=2, batch_norm=False)
        optimizer = optim.make_optimizer(train_config.optimizer_settings(config, None))
        optimizer.build(model.trainable_variables)
    return model, optimizer


def step_outcome(model, optimizer, step, distributed_batch):
    """Run ``step`` once; the loss scale after it and how the weights moved."""
    before = [w.copy() for w in model.get_weights()]
    step(distributed_batch)
    after = model.get_weights()
    return {"scale": float(optimizer.dynamic_scale.numpy()),
            "weights_finite": all(bool(np.isfinite(w).all()) for w in after),
            "max_weight_change": max(float(np.max(np.abs(a - b))) for a, b in zip(after, before))}


def overflow_on_one_tower(towers, images, masks, overflowing_tower):
    """One --mixed_precision float16 step where only ``overflowing_tower``'s batch overflows
    float16 (pixel values of 1e6 > 65504)."""
    import keras

    import steps

    keras.mixed_precision.set_global_policy(steps.precision_policy("float16"))
    try:
        strategy = distribute.build_strategy(towers, "/cpu:0")
        model, optimizer = float16_model(strategy)
        step = steps.make_train_step(strategy, model, optimizer, "ce", 2, global_batch_size=4)
        batches = split(images, masks % 2)
        batches[overflowing_tower] = (batches[overflowing_tower][0] * 1e6, batches[overflowing_tower][1])
        return step_outcome(model, optimizer, step, distribute.distribute_batches(strategy, batches))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def bfloat16_step(towers, images, masks):
    """One --mixed_precision bfloat16 step: computed in bfloat16, no loss scaling."""
    import keras

    import models
    import steps
    import optim
    import train_config

    keras.mixed_precision.set_global_policy(steps.precision_policy("bfloat16"))
    try:
        strategy = distribute.build_strategy(towers, "/cpu:0")
        config = train_config.TrainConfig("unet", "", "", "", learning_rate=1e-3, mixed_precision="bfloat16")
        with strategy.scope():
            model = models.build_model("unet", 2, input_channels=1, base_filters=2, unet_depth=2)
            optimizer = optim.make_optimizer(train_config.optimizer_settings(config, None))
            optimizer.build(model.trainable_variables)
        step = steps.make_train_step(strategy, model, optimizer, "ce", 2, global_batch_size=4)
        loss = float(step(distribute.distribute_batches(strategy, split(images, masks % 2))))
        return {"loss": loss, "optimizer": type(optimizer).__name__,
                "compute_dtype": model.get_layer("enc1_conv1").compute_dtype,
                "variable_dtype": model.get_layer("enc1_conv1").kernel.dtype}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def towers_main():
    towers = distribute.configure_devices(cpu_towers=2)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
    masks = rng.integers(0, 3, size=(4, 32, 32)).astype(np.int32)
    masks[1, :8] = -1                                      # ignored pixels
    result = tower_equivalence(towers, images, masks)
    for name in ("/cpu:0", "/cpu:1"):
        result["reduce " + name], result["variables"] = reduction_devices(towers, images, masks, name)
    result["reduce xla /cpu:1"], _ = reduction_devices(towers, images, masks, "/cpu:1", jit_compile=True)
    result.update(batch_norm_sync(towers, images, masks))
    for tower in (0, 1):
        result[f"overflow on tower {tower}"] = overflow_on_one_tower(towers, images, masks, tower)
    result["bfloat16"] = bfloat16_step(towers, images, masks)
    return result


def worker_overflow_main():
    """This worker's outcome of one float16 step in which only worker 1's batch overflows."""
    import keras

    import steps

    cluster = distribute.detect_cluster(os.environ)
    towers = distribute.configure_devices(gpus="none")
    # A short timeout: a worker left alone in the all-reduce fails the test instead of hanging it.
    strategy = distribute.build_strategy(towers, "/cpu:0", cluster, communication_timeout_s=60)
    info = distribute.cluster_info(strategy)
    keras.mixed_precision.set_global_policy(steps.precision_policy("float16"))
    model, optimizer = float16_model(strategy)
    step = steps.make_train_step(strategy, model, optimizer, "ce", 2, global_batch_size=4)
    rng = np.random.default_rng(info.worker_index)
    images = rng.normal(size=(2, 32, 32, 1)).astype(np.float32) * (1e6 if info.worker_index == 1 else 1.0)
    masks = rng.integers(0, 2, size=(2, 32, 32)).astype(np.int32)
    outcome = step_outcome(model, optimizer, step, distribute.distribute_batches(strategy, [(images, masks)]))
    return dict(outcome, worker=info.worker_index, workers=info.num_workers)


if __name__ == "__main__":
    print("RESULT " + json.dumps({"towers": towers_main, "worker_overflow": worker_overflow_main}[sys.argv[1]]()))
