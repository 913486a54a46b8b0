"""UNet (Ronneberger et al. 2015) with 'same' padding and batch normalisation.

Four down levels (two 3x3 conv + BN + ReLU, then 2x2 max-pool), a bottleneck, four up levels (2x2
transposed conv, concatenation with the encoder features of the same size, two 3x3 conv + BN + ReLU)
and a 1x1 conv to the class logits. Stage names: enc1..enc4 (enc1 at full resolution), bottleneck,
dec4..dec1 (dec_i restores enc_i's resolution and concatenates its features), logits.
"""
import keras

from models.layers import (conv_bn_relu, interval_conv, interval_pool, interval_union,
                           interval_upsample, model_input)

DEPTH = 4
SIZE_DIVISOR = 2 ** DEPTH
# Registry entries (see models/__init__.py): every op of a UNet has an XLA kernel.
XLA_PROBLEM = None


def build_unet(number_classes, input_channels=1, base_filters=64, input_size=None, batch_norm=True):
    """Build a UNet.

    Args:
      number_classes: channels of the output logits.
      input_channels: channels of the input image.
      base_filters: F, the feature depth of the first level; level i has F * 2**(i-1), the bottleneck
        16F.
      input_size: None for an (None, None, C) input that accepts any H, W divisible by 16, or an int /
        (H, W) pair fixing the size (ValueError when not divisible by 16).
      batch_norm: False drops every BatchNormalization (the convs then carry a bias).

    Returns:
      keras.Model named "unet": float32 (B, H, W, C) images -> (B, H, W, number_classes) float32
      logits from the layer "logits".
    """
    inputs = model_input("unet", input_channels, input_size, SIZE_DIVISOR)

    # ---- Encoder: level i runs at scale s = 2**(i-1); keep its features for the skip ----
    x = inputs
    skips = []
    for level in range(1, DEPTH + 1):
        scale = 2 ** (level - 1)
        stage = f"enc{level}"
        x = conv_bn_relu(x, base_filters * scale, stage, 1, batch_norm)
        x = conv_bn_relu(x, base_filters * scale, stage, 2, batch_norm)  # (B, H/s, W/s, sF)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"{stage}_pool")(x)  # (B, H/2s, W/2s, sF)

    # ---- Bottleneck ----
    filters = base_filters * 2 ** DEPTH
    x = conv_bn_relu(x, filters, "bottleneck", 1, batch_norm)
    x = conv_bn_relu(x, filters, "bottleneck", 2, batch_norm)  # (B, H/16, W/16, 16F)

    # ---- Decoder: upsample to level i's scale s, then merge enc_i's features ----
    for level in range(DEPTH, 0, -1):
        scale = 2 ** (level - 1)
        stage = f"dec{level}"
        x = keras.layers.Conv2DTranspose(base_filters * scale, 2, strides=2,
                                         name=f"{stage}_upconv")(x)  # (B, H/s, W/s, sF)
        x = keras.layers.Concatenate(name=f"{stage}_concat")([skips[level - 1], x])  # (B, H/s, W/s, 2sF)
        x = conv_bn_relu(x, base_filters * scale, stage, 1, batch_norm)
        x = conv_bn_relu(x, base_filters * scale, stage, 2, batch_norm)  # (B, H/s, W/s, sF)

    # float32 even under a mixed_float16 policy, so the softmax and the loss are computed accurately.
    logits = keras.layers.Conv2D(number_classes, 1, name="logits", dtype="float32")(x)  # (B, H, W, K)
    return keras.Model(inputs, logits, name="unet")


def receptive_field():
    """Side, in input pixels, of the largest square of input pixels one UNet output pixel depends on.

    Computed by following one axis from an output pixel back to the input (``models.layers``
    interval functions): a 3x3 conv widens the range by one pixel each side, a 2x2 pool maps range
    lo..hi to 2lo..2hi+1, a 2x2 stride-2 transposed conv maps lo..hi to lo//2..hi//2, and a concat takes
    the union of its two inputs' ranges. Pooling makes the range depend on the pixel's position modulo
    16, so the result is the maximum over those 16 positions. Independent of base_filters and
    batch_norm; the same along both axes.
    """
    def encoder(interval, level):
        # Input range seen by enc{level}'s last conv outputs in ``interval`` (coordinates of that level).
        interval = interval_conv(interval_conv(interval))
        if level == 1:
            return interval
        return encoder(interval_pool(interval), level - 1)

    def decoder(interval, level):
        # Input range seen by dec{level}'s (or, past the deepest level, the bottleneck's) outputs.
        interval = interval_conv(interval_conv(interval))
        if level > DEPTH:
            return encoder(interval_pool(interval), DEPTH)
        coarser = decoder(interval_upsample(interval), level + 1)
        return interval_union(encoder(interval, level), coarser)

    sizes = []
    for position in range(SIZE_DIVISOR):
        lo, hi = decoder((position, position), 1)
        sizes.append(hi - lo + 1)
    return max(sizes)


build = build_unet
