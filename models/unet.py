"""UNet (Ronneberger et al. 2015) with 'same' padding and batch normalisation.

``depth`` down levels (two 3x3 conv + BN + ReLU, then 2x2 max-pool; 4 by default), a bottleneck,
``depth`` up levels (upsampling, concatenation with the encoder features of the same size, two 3x3
conv + BN + ReLU) and a 1x1 conv to the class logits. The upsampling is a 2x2 stride-2 transposed conv
("transpose", the paper's), or bilinear upsampling followed by a 3x3 conv ("bilinear", as NVIDIA's
TinyUNet, which also cut UNet to 3 levels because the full one over-fitted a small data set).
With ``encoder="residual"`` the two convs of every encoder level and of the bottleneck form a
residual block (He et al. 2016's basic block: conv-BN-ReLU, conv-BN, plus the level's input through a
1x1 conv-BN where the channel count changes, then ReLU), one block per level: the block of
nnU-Net's residual-encoder UNets (ResEnc, Isensee et al. 2024), which stack 1 to 6 of them per level.
Stage names: enc1..enc<depth> (enc1 at full resolution), bottleneck, dec<depth>..dec1 (dec_i restores
enc_i's resolution and concatenates its features), logits.
"""
import numbers

import keras

from models.layers import (conv_bn_relu, interval_conv, interval_pool, interval_union,
                           interval_upsample, model_input)

DEPTH = 4
UPSAMPLING = ("transpose", "bilinear")
ENCODERS = ("plain", "residual")
SIZE_DIVISOR = 2 ** DEPTH  # of the default depth; size_divisor(depth) for the others
# Registry entries (see models/__init__.py): every op of a UNet has an XLA kernel.
XLA_PROBLEM = None
PRECISION_PROBLEM = None
DISPLAY_NAME = "UNet"
CITATION = ("Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for Biomedical Image Segmentation. "
            "MICCAI 2015", "10.1007/978-3-319-24574-4_28")
# The training-config keys that shape this network -> (builder argument, default).
OPTIONS = {"unet_depth": ("depth", DEPTH), "upsampling": ("upsampling", "transpose"),
           "encoder": ("encoder", "plain")}


@keras.saving.register_keras_serializable(package="segtool")
class BilinearUpsampling2D(keras.layers.Layer):
    """x2 bilinear upsampling (half-pixel centres, edges clamped) of a (B, H, W, C) tensor of any H, W.

    keras.layers.UpSampling2D(interpolation="bilinear") does the same arithmetic but cannot be traced
    with an unknown H, W (it turns the dynamic shape into a Python bool), which inference's
    tf.function over any tile size needs.
    """

    def call(self, inputs):
        import tensorflow as tf

        size = tf.shape(inputs)[1:3] * 2
        return tf.cast(tf.image.resize(inputs, size, method="bilinear"), inputs.dtype)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, None if height is None else 2 * height, None if width is None else 2 * width, channels)


def check_options(depth=DEPTH, upsampling="transpose", encoder="plain"):
    """ValueError naming the flag unless ``depth``/``upsampling``/``encoder`` describe a buildable UNet."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or not 1 <= depth <= 6:
        raise ValueError(f"--unet_depth {depth!r}: expected an integer from 1 to 6")
    if upsampling not in UPSAMPLING:
        raise ValueError(f"--upsampling {upsampling!r}: expected one of {', '.join(UPSAMPLING)}")
    if encoder not in ENCODERS:
        raise ValueError(f"--encoder {encoder!r}: expected one of {', '.join(ENCODERS)}")


def size_divisor(depth=DEPTH, upsampling="transpose", encoder="plain"):
    """H and W must be multiples of this: one factor 2 per pooling."""
    check_options(depth, upsampling, encoder)
    return 2 ** depth


def build_unet(number_classes, input_channels=1, base_filters=64, input_size=None, batch_norm=True,
               depth=DEPTH, upsampling="transpose", encoder="plain"):
    """Build a UNet.

    Args:
      number_classes: channels of the output logits.
      input_channels: channels of the input image.
      base_filters: F, the feature depth of the first level; level i has F * 2**(i-1), the bottleneck
        F * 2**depth.
      input_size: None for an (None, None, C) input that accepts any H, W divisible by 2**depth, or an
        int / (H, W) pair fixing the size (ValueError when not divisible).
      batch_norm: False drops every BatchNormalization (the convs then carry a bias).
      depth: number of poolings (levels below full resolution).
      upsampling: "transpose" (2x2 stride-2 transposed conv) or "bilinear" (bilinear x2 + 3x3 conv).
      encoder: "plain" (two conv-BN-ReLU per level) or "residual" (the same two convs as a residual
        block, see ``residual_block``), for the encoder levels and the bottleneck.

    Returns:
      keras.Model named "unet": float32 (B, H, W, C) images -> (B, H, W, number_classes) float32
      logits from the layer "logits".
    """
    inputs = model_input("unet", input_channels, input_size, size_divisor(depth, upsampling, encoder))
    depth = int(depth)
    block = residual_block if encoder == "residual" else plain_block

    # ---- Encoder: level i runs at scale s = 2**(i-1); keep its features for the skip ----
    x = inputs
    skips = []
    for level in range(1, depth + 1):
        scale = 2 ** (level - 1)
        stage = f"enc{level}"
        x = block(x, base_filters * scale, stage, batch_norm)  # (B, H/s, W/s, sF)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"{stage}_pool")(x)  # (B, H/2s, W/2s, sF)

    # ---- Bottleneck ----
    filters = base_filters * 2 ** depth
    x = block(x, filters, "bottleneck", batch_norm)  # (B, H/2^depth, W/2^depth, 2^depth F)

    # ---- Decoder: upsample to level i's scale s, then merge enc_i's features ----
    for level in range(depth, 0, -1):
        scale = 2 ** (level - 1)
        stage = f"dec{level}"
        if upsampling == "transpose":
            x = keras.layers.Conv2DTranspose(base_filters * scale, 2, strides=2,
                                             name=f"{stage}_upconv")(x)  # (B, H/s, W/s, sF)
        else:
            x = BilinearUpsampling2D(name=f"{stage}_upsample")(x)
            # The conv gives the upsampled features the channel count (and learned mixing) the
            # transposed conv would.
            x = keras.layers.Conv2D(base_filters * scale, 3, padding="same",
                                    name=f"{stage}_upconv")(x)  # (B, H/s, W/s, sF)
        x = keras.layers.Concatenate(name=f"{stage}_concat")([skips[level - 1], x])  # (B, H/s, W/s, 2sF)
        x = conv_bn_relu(x, base_filters * scale, stage, 1, batch_norm)
        x = conv_bn_relu(x, base_filters * scale, stage, 2, batch_norm)  # (B, H/s, W/s, sF)

    # float32 even under a mixed_float16 policy, so the softmax and the loss are computed accurately.
    logits = keras.layers.Conv2D(number_classes, 1, name="logits", dtype="float32")(x)  # (B, H, W, K)
    return keras.Model(inputs, logits, name="unet")


def plain_block(x, filters, stage, batch_norm):
    """Two 3x3 conv (+ BN) + ReLU: the original UNet's level."""
    x = conv_bn_relu(x, filters, stage, 1, batch_norm)
    return conv_bn_relu(x, filters, stage, 2, batch_norm)


def residual_block(x, filters, stage, batch_norm):
    """The same two 3x3 convs as a residual (basic) block: relu(conv-BN(conv-BN-ReLU(x)) + shortcut(x)).

    The shortcut is x itself when it already has ``filters`` channels, else a 1x1 conv (+ BN) to them.
    The identity path lets the gradient reach early layers undiminished, which is why deep residual
    encoders train where plain ones of the same depth stall. The output layer is named
    f"{stage}_relu2", as in ``plain_block``, so both encoders expose the same stage outputs.
    """
    shortcut = x
    x = conv_bn_relu(x, filters, stage, 1, batch_norm)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, kernel_initializer="he_normal",
                            name=f"{stage}_conv2")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{stage}_bn2")(x)
    if shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, use_bias=not batch_norm, kernel_initializer="he_normal",
                                       name=f"{stage}_shortcut")(shortcut)
        if batch_norm:
            shortcut = keras.layers.BatchNormalization(name=f"{stage}_shortcut_bn")(shortcut)
    x = keras.layers.Add(name=f"{stage}_add")([x, shortcut])
    return keras.layers.ReLU(name=f"{stage}_relu2")(x)


def options_of(model):
    """The config options ({"unet_depth", "upsampling", "encoder"}) a built UNet was made with, read
    from its stage names (for a .keras file without its training config.json)."""
    names = {layer.name for layer in model.layers}
    depth = sum(1 for level in range(1, 7) if f"enc{level}_pool" in names)
    return {"unet_depth": depth, "upsampling": "bilinear" if "dec1_upsample" in names else "transpose",
            "encoder": "residual" if "enc1_add" in names else "plain"}


def _interval_bilinear(interval):
    """Bilinear x2 upsampling (half-pixel centres, BilinearUpsampling2D): output p samples the input at
    p/2 - 1/4, so it reads inputs floor(p/2 - 1/4) and the one after, both with non-zero weight."""
    lo, hi = interval
    return (lo - 1) // 2, (hi + 1) // 2


def receptive_field(depth=DEPTH, upsampling="transpose", encoder="plain"):
    """Side, in input pixels, of the largest square of input pixels one UNet output pixel depends on.

    Computed by following one axis from an output pixel back to the input (``models.layers``
    interval functions): a 3x3 conv widens the range by one pixel each side, a 2x2 pool maps range
    lo..hi to 2lo..2hi+1, a 2x2 stride-2 transposed conv maps lo..hi to lo//2..hi//2 (bilinear
    upsampling + 3x3 conv: see ``_interval_bilinear``), and a concat takes the union of its two inputs'
    ranges. Pooling makes the range depend on the pixel's position modulo 2**depth, so the result is
    the maximum over those positions: 204 for the default depth 4 with transposed convs. Independent
    of base_filters, batch_norm and the encoder (a residual block's 1x1 shortcut sees less than its
    two 3x3 convs); the same along both axes.
    """
    check_options(depth, upsampling, encoder)

    def encoder(interval, level):
        # Input range seen by enc{level}'s last conv outputs in ``interval`` (coordinates of that level).
        interval = interval_conv(interval_conv(interval))
        if level == 1:
            return interval
        return encoder(interval_pool(interval), level - 1)

    def upsample(interval):
        if upsampling == "transpose":
            return interval_upsample(interval)
        return _interval_bilinear(interval_conv(interval))

    def decoder(interval, level):
        # Input range seen by dec{level}'s (or, past the deepest level, the bottleneck's) outputs.
        interval = interval_conv(interval_conv(interval))
        if level > depth:
            return encoder(interval_pool(interval), depth)
        coarser = decoder(upsample(interval), level + 1)
        return interval_union(encoder(interval, level), coarser)

    sizes = []
    for position in range(2 ** depth):
        lo, hi = decoder((position, position), 1)
        sizes.append(hi - lo + 1)
    return max(sizes)


build = build_unet
