"""Losses and the per-replica train step.

The train step and the test pass (evaluation.py) start from the same additive per-pixel sums
(``pixel_sums``): the train step per image (each image's loss is averaged over its own pixels, then
over the global batch), the test pass over whole test images (added up over the test set, so the
test loss is exact). ``loss_from_sums``
turns either into the loss, so a loss is written once:

    ce       = ce_sum / pixels                                        (mean cross-entropy)
    dice     = 1 - mean over classes 1..K-1 of (2 I + 1) / (P + L + 1) (soft Dice, foreground classes)
    skeleton = 1 - mean over classes 1..K-1 of (H + 1) / (S + 1)      (skeleton recall)

Skeleton recall (Kirchhoff et al., ECCV 2024) is for thin structures (vessels, membranes,
filaments), where a Dice term is content with the thick parts: S counts the pixels of the true
mask's skeleton, widened to a 3 px tube, H the softmax mass the network puts on them, so a vessel
broken anywhere costs recall. The skeleton here is the soft skeleton of clDice (Shit et al., CVPR
2021: repeated min/max-pool erosion and opening), which on a binary mask is a skeleton computed in
the graph, so the readers need no extra target and the test pass scores the same loss.

Label -1 (records.IGNORE_LABEL) is the one "no class here" mechanism: the padding of a test batch and
the unlabelled pixels of a sparse annotation (build_lmdb.py --unlabelled_value / --scribbles store them
as -1) are left out of every sum, so each image's loss is its mean over its annotated pixels.

Distribution (running the replica functions, reducing their results) is in distribute.py.
"""
import typing

import distribute

# The additive terms each loss needs.
LOSS_TERMS = {"ce": ("ce",), "dice": ("dice",), "ce+dice": ("ce", "dice"),
              "ce+dice+skeleton": ("ce", "dice", "skeleton")}
LOSSES = tuple(LOSS_TERMS)
ALL_TERMS = ("ce", "dice", "skeleton")
DICE_SMOOTH = 1.0
# Erosion rounds of the soft skeleton: structures up to about twice this many pixels wide get a
# complete skeleton (vessels and membranes are a few pixels wide; the cores of wider objects are
# simply not part of it, which only weakens the term there).
SKELETON_ITERATIONS = 10
# --mixed_precision choices and their Keras policies (None: float32 throughout).
_POLICIES = {None: "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
MIXED_PRECISIONS = ("float16", "bfloat16")


class PixelSums(typing.NamedTuple):
    """Sums over the valid pixels (label >= 0) of an image or a set of images.

    pixels: valid pixel count; ce_sum: summed cross-entropy; intersection, prob_sum, label_sum:
    per-class [..., K] sums of softmax x one-hot, softmax, one-hot (soft Dice); skeleton_hit,
    skeleton_sum: per-class sums of softmax x true skeleton tube, and of the tube (skeleton
    recall). A term a loss does not need is None.
    """
    pixels: object
    ce_sum: object = None
    intersection: object = None
    prob_sum: object = None
    label_sum: object = None
    skeleton_hit: object = None
    skeleton_sum: object = None


def soft_skeleton(masks, iterations=SKELETON_ITERATIONS):
    """Soft skeleton (clDice) of float masks [B, H, W, K] in [0, 1], per channel; on binary masks a
    binary skeleton, widened here to a 3 px tube (the tolerance of skeleton recall)."""
    import tensorflow as tf

    def erode(x):  # a plus-shaped min-pool keeps one-pixel lines connected
        return tf.minimum(-tf.nn.max_pool2d(-x, (3, 1), 1, "SAME"), -tf.nn.max_pool2d(-x, (1, 3), 1, "SAME"))

    def dilate(x):
        return tf.nn.max_pool2d(x, 3, 1, "SAME")

    skeleton = tf.nn.relu(masks - dilate(erode(masks)))
    for _ in range(iterations):
        masks = erode(masks)
        delta = tf.nn.relu(masks - dilate(erode(masks)))
        skeleton = skeleton + tf.nn.relu(delta - skeleton * delta)
    return dilate(skeleton)


def pixel_sums(logits, masks, number_classes, terms=("ce", "dice"), axis=(1, 2), dtype="float32"):
    """Additive loss sums of ``logits`` against ``masks`` over ``axis`` (label -1 = ignore).

    Args:
      logits: float [B, H, W, K]; masks: int32 [B, H, W].
      terms: which of ALL_TERMS ("ce", "dice", "skeleton") to compute.
      axis: the axes summed: (1, 2) gives per-image sums [B] / [B, K], (0, 1, 2) batch totals.
      dtype: dtype of the per-pixel terms before summing (float64 keeps test-set totals exact).
    Returns:
      PixelSums.
    """
    import tensorflow as tf

    logits = tf.cast(logits, tf.float32)
    valid = tf.cast(masks >= 0, tf.float32)
    labels = tf.maximum(masks, 0)
    axis = list(axis)
    sums = {"pixels": tf.reduce_sum(tf.cast(valid, dtype), axis=axis)}
    if "ce" in terms:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        sums["ce_sum"] = tf.reduce_sum(tf.cast(ce * valid, dtype), axis=axis)
    if "dice" in terms:
        probs = tf.nn.softmax(logits) * valid[..., None]
        onehot = tf.one_hot(labels, number_classes) * valid[..., None]
        sums["intersection"] = tf.reduce_sum(tf.cast(probs * onehot, dtype), axis=axis)
        sums["prob_sum"] = tf.reduce_sum(tf.cast(probs, dtype), axis=axis)
        sums["label_sum"] = tf.reduce_sum(tf.cast(onehot, dtype), axis=axis)
    if "skeleton" in terms:
        # Unlabelled pixels count as "not this class" for the skeleton and are then left out, so
        # nothing flows back from them.
        onehot = tf.one_hot(labels, number_classes) * valid[..., None]
        tube = soft_skeleton(onehot) * valid[..., None]
        probs = tf.nn.softmax(logits)
        sums["skeleton_hit"] = tf.reduce_sum(tf.cast(probs * tube, dtype), axis=axis)
        sums["skeleton_sum"] = tf.reduce_sum(tf.cast(tube, dtype), axis=axis)
    return PixelSums(**sums)


def loss_from_sums(sums, loss_name):
    """The loss ``loss_name`` from PixelSums of any leading shape (per image, or totals).

    A set with no valid pixel (an all-ignored padding image) has cross-entropy 0, not 0/0.
    """
    import tensorflow as tf

    terms = []
    if "ce" in LOSS_TERMS[loss_name]:
        terms.append(sums.ce_sum / tf.maximum(sums.pixels, 1))
    if "dice" in LOSS_TERMS[loss_name]:
        dice = (2.0 * sums.intersection + DICE_SMOOTH) / (sums.prob_sum + sums.label_sum + DICE_SMOOTH)
        terms.append(1.0 - tf.reduce_mean(dice[..., 1:], axis=-1))
    if "skeleton" in LOSS_TERMS[loss_name]:
        recall = (sums.skeleton_hit + DICE_SMOOTH) / (sums.skeleton_sum + DICE_SMOOTH)
        terms.append(1.0 - tf.reduce_mean(recall[..., 1:], axis=-1))
    return tf.add_n(terms)


def per_image_loss(logits, masks, loss_name, number_classes):
    """Loss of each image, averaged over its valid pixels: float32 [B] from logits [B, H, W, K]
    and int32 masks [B, H, W] (label -1 = ignore)."""
    return loss_from_sums(pixel_sums(logits, masks, number_classes, LOSS_TERMS[loss_name]), loss_name)


def precision_policy(mixed_precision):
    """The Keras dtype policy of a --mixed_precision value (None, "float16" or "bfloat16")."""
    return _POLICIES[mixed_precision]


def make_train_step(strategy, model, optimizer, loss_name, number_classes, global_batch_size,
                    jit_compile=False):
    """A tf.function running one optimizer step on a distributed (images, masks) batch.

    Returns:
      step(distributed_batch) -> scalar loss: the mean over all images of all towers and workers.
    """
    def batch_loss(images, masks):
        return per_image_loss(model(images, training=True), masks, loss_name, number_classes)

    return make_step(strategy, model, optimizer, batch_loss, global_batch_size, jit_compile)


def make_step(strategy, model, optimizer, batch_loss, global_batch_size, jit_compile=False):
    """make_train_step for any loss: ``batch_loss(images, masks)`` runs the model and returns the loss
    of each image, float32 [B] (pretext.py's tasks use it with their own inputs and targets)."""
    import tensorflow as tf

    def loss_and_gradients(images, masks):
        with tf.GradientTape() as tape:
            # Divide by the GLOBAL batch exactly once. The all-reduce then *sums* the replicas'
            # gradients, which gives the gradient of the mean over every image of every tower.
            # Keras 3 losses already scale by 1/num_replicas inside a strategy, so they are not
            # used here: combining them with this division would shrink the loss twice.
            loss = tf.nn.compute_average_loss(batch_loss(images, masks), global_batch_size=global_batch_size)
            scaled_loss = optimizer.scale_loss(loss)  # identity unless --mixed_precision
        return loss, tape.gradient(scaled_loss, model.trainable_variables)

    if jit_compile:
        # Compile the forward and backward pass only. The cross-tower gradient sum and the update
        # stay outside XLA, so they still run on the --gradient_update_location device (an
        # all-reduce inside XLA would bypass it) and towers on logical CPU devices keep working.
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

    def replica_step(images, masks):
        loss, gradients = loss_and_gradients(images, masks)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    return distribute.make_distributed_step(strategy, replica_step, reduce_sum=True)
