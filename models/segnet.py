"""SegNet (Badrinarayanan et al. 2015) with batch normalisation.

A VGG16-style encoder of five blocks (2, 2, 3, 3, 3 convs of 3x3 + BN + ReLU with F, 2F, 4F, 8F, 8F
filters), each ending in a 2x2 max-pool that records the argmax of every window, and a mirrored
decoder whose blocks first max-unpool with those indices (each value goes back to where its maximum
came from, zeros elsewhere) and then convolve. Stage names: enc1..enc5 (enc1 at full resolution),
dec5..dec1 (dec_i unpools with enc_i's indices), logits.

The argmax pooling (``tf.nn.max_pool_with_argmax``) has no XLA kernel: a SegNet cannot be compiled
with ``jit_compile=True``.
"""
import keras

from models.layers import (MaxPoolingWithArgmax2D, MaxUnpooling2D, conv_bn_relu, interval_conv,
                           interval_pool, interval_union, interval_upsample, model_input)

# Convs per block and each block's filters as a multiple of base_filters (VGG16's 64..512 at F=64).
BLOCK_CONVS = (2, 2, 3, 3, 3)
BLOCK_WIDTHS = (1, 2, 4, 8, 8)
SIZE_DIVISOR = 2 ** len(BLOCK_CONVS)
# Registry entry (see models/__init__.py): why --xla is refused for this model.
XLA_PROBLEM = ("its argmax max-pooling (tf.nn.max_pool_with_argmax) has no XLA kernel; train SegNet "
               "without --xla")
# Registry entry: why inference.py --precision bfloat16 / float16 is refused for this model. Measured
# on four random-weight networks each (base_filters 16, 256 px): the class of 4-10 % of a SegNet's
# pixels changes in bfloat16 and 1-4 % in float16, against 0-0.35 % and 0-0.07 % of a UNet's:
# rounding turns near-ties of the pooling windows into other maxima, and the unpooling then puts
# features in other places.
PRECISION_PROBLEM = ("its max-unpooling puts each feature where the pooling found the maximum, and in 16 bits "
                     "near-ties in the pooling windows pick other places (measured: the class of 1-10 % of the "
                     "pixels changes); use --precision float32")
DISPLAY_NAME = "SegNet"
CITATION = ("Badrinarayanan, Kendall, Cipolla: SegNet: A Deep Convolutional Encoder-Decoder Architecture for "
            "Image Segmentation. IEEE TPAMI 2017", "10.1109/TPAMI.2016.2644615")


def build_segnet(number_classes, input_channels=1, base_filters=64, input_size=None, batch_norm=True):
    """Build a SegNet.

    Args:
      number_classes: channels of the output logits.
      input_channels: channels of the input image.
      base_filters: F, the feature depth of the first block (VGG16 uses 64).
      input_size: None for an (None, None, C) input that accepts any H, W divisible by 32, or an int /
        (H, W) pair fixing the size (ValueError when not divisible by 32).
      batch_norm: False drops every BatchNormalization (the convs then carry a bias).

    Returns:
      keras.Model named "segnet": float32 (B, H, W, C) images -> (B, H, W, number_classes) float32
      logits from the layer "logits".
    """
    inputs = model_input("segnet", input_channels, input_size, SIZE_DIVISOR)

    # ---- Encoder: block i runs at scale s = 2**(i-1) with w = BLOCK_WIDTHS[i-1]; keep its pre-pool
    # tensor (for the unpooling's output shape) and its argmax indices ----
    x = inputs
    pre_pool, indices = [], []
    for level, (convs, width) in enumerate(zip(BLOCK_CONVS, BLOCK_WIDTHS), start=1):
        stage = f"enc{level}"
        for index in range(1, convs + 1):
            x = conv_bn_relu(x, base_filters * width, stage, index, batch_norm)  # (B, H/s, W/s, wF)
        pre_pool.append(x)
        x, argmax = MaxPoolingWithArgmax2D(2, name=f"{stage}_pool")(x)  # both (B, H/2s, W/2s, wF)
        indices.append(argmax)

    # ---- Decoder: unpool to the recorded positions, then densify with convs. The last conv of each
    # block narrows to the next (shallower) block's width, mirroring the encoder ----
    for level in range(len(BLOCK_CONVS), 0, -1):
        stage = f"dec{level}"
        x = MaxUnpooling2D(name=f"{stage}_unpool")(
            [x, indices[level - 1], pre_pool[level - 1]])  # (B, H/s, W/s, wF)
        convs = BLOCK_CONVS[level - 1]
        out_width = BLOCK_WIDTHS[max(level - 2, 0)]
        for index in range(1, convs + 1):
            width = out_width if index == convs else BLOCK_WIDTHS[level - 1]
            x = conv_bn_relu(x, base_filters * width, stage, index, batch_norm)
        # (B, H/s, W/s, w'F) with w' the next shallower block's width (block 1's for dec1)

    # float32 even under a mixed_float16 policy, so the softmax and the loss are computed accurately.
    logits = keras.layers.Conv2D(number_classes, 1, name="logits", dtype="float32")(x)  # (B, H, W, K)
    return keras.Model(inputs, logits, name="segnet")


def receptive_field():
    """Side, in input pixels, of the largest square of input pixels one SegNet output pixel depends on.

    Computed like ``models.unet.receptive_field``, following one axis from an output pixel back to the
    input: a 3x3 conv widens the range by one pixel each side, a 2x2 pool maps lo..hi to 2lo..2hi+1.
    An unpooled pixel p depends on the pooled value at p//2 and, through its argmax index, on the
    encoder features in the pooling window 2(p//2)..2(p//2)+1; both ranges are followed and united.
    The maximum over the 32 positions modulo 32 is returned. Independent of base_filters and
    batch_norm; the same along both axes.
    """
    def encoder(interval, level):
        # Input range seen by enc{level}'s last conv outputs in ``interval``.
        for _ in range(BLOCK_CONVS[level - 1]):
            interval = interval_conv(interval)
        if level == 1:
            return interval
        return encoder(interval_pool(interval), level - 1)

    def decoder(interval, level):
        # Input range seen by dec{level}'s last conv outputs in ``interval``.
        for _ in range(BLOCK_CONVS[level - 1]):
            interval = interval_conv(interval)
        pooled = interval_upsample(interval)
        # The pooling window behind each index; at the deepest level it also holds the pooled values.
        window = encoder(interval_pool(pooled), level)
        if level == len(BLOCK_CONVS):
            return window
        return interval_union(window, decoder(pooled, level + 1))

    sizes = []
    for position in range(SIZE_DIVISOR):
        lo, hi = decoder((position, position), 1)
        sizes.append(hi - lo + 1)
    return max(sizes)


build = build_segnet
