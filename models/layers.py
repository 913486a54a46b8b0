"""Building blocks shared by the UNet and SegNet builders.

- ``conv_bn_relu``: the 3x3 conv (+ batch norm) + ReLU unit both networks are made of.
- ``MaxPoolingWithArgmax2D`` / ``MaxUnpooling2D``: SegNet's pooling that remembers where each maximum
  came from, and the unpooling that puts every value back at that position.
- ``interval_*``: 1-D interval arithmetic used by the builders' ``receptive_field`` functions to work
  out, layer by layer from the output back to the input, which input pixels one output pixel can see.

Note on XLA: ``tf.nn.max_pool_with_argmax`` has no XLA kernel, so a model containing
``MaxPoolingWithArgmax2D`` (SegNet) cannot be compiled with ``jit_compile=True``: on CPU TensorFlow 2.21
raises InvalidArgumentError "Detected unsupported operations when trying to compile graph ... on
XLA_CPU_JIT: MaxPoolWithArgmax (No registered 'MaxPoolWithArgmax' OpKernel ...)" (the same for model.fit
with ``jit_compile=True``; Keras' default ``jit_compile="auto"`` leaves it uncompiled and works).
"""
import numbers

import keras
import tensorflow as tf


def conv_bn_relu(x, filters, stage, index, batch_norm=True):
    """3x3 'same' convolution, optional batch normalisation, ReLU.

    Args:
      x: (B, H, W, C) tensor.
      filters: output channels.
      stage, index: name the layers f"{stage}_conv{index}", f"{stage}_bn{index}" and
        f"{stage}_relu{index}" (e.g. "enc1_conv2").
      batch_norm: add BatchNormalization after the conv (the conv then has no bias, which BN's beta
        would make redundant).

    Returns:
      (B, H, W, filters) tensor.
    """
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                            kernel_initializer="he_normal", name=f"{stage}_conv{index}")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{stage}_bn{index}")(x)
    return keras.layers.ReLU(name=f"{stage}_relu{index}")(x)


@keras.saving.register_keras_serializable(package="segtool")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """Max pooling that also returns where each maximum was.

    Wraps ``tf.nn.max_pool_with_argmax`` with ``include_batch_in_index=True``, so an index is the flat
    position ``((b * H + y) * W + x) * C + c`` in the whole (B, H, W, C) input tensor; that is what lets
    ``MaxUnpooling2D`` scatter a batch back in one ``tf.scatter_nd``. The op has no XLA kernel.

    Args:
      pool_size: window side (square windows).
      strides: step between windows; defaults to ``pool_size``.
      padding: "valid" or "same".

    Call returns ``[pooled, indices]``: pooled (B, H/s, W/s, C) in the input dtype, indices of the same
    shape, int64.
    """

    def __init__(self, pool_size=2, strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)
        self.strides = int(strides) if strides is not None else self.pool_size
        self.padding = padding.lower()
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding {padding!r}: expected 'valid' or 'same'")

    def call(self, inputs):
        pooled, indices = tf.nn.max_pool_with_argmax(
            inputs, ksize=self.pool_size, strides=self.strides, padding=self.padding.upper(),
            output_dtype=tf.int64, include_batch_in_index=True)
        return [pooled, indices]

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=self.pool_size, strides=self.strides, padding=self.padding)
        return config


@keras.saving.register_keras_serializable(package="segtool")
class MaxUnpooling2D(keras.layers.Layer):
    """Inverse of ``MaxPoolingWithArgmax2D``: each value goes back to the position its index records,
    every other position is zero.

    Call with ``[values, indices, reference]``: values and indices are the two outputs of the pooling
    layer (or tensors of the same shape), reference is the tensor that was pooled. Only reference's
    (dynamic) shape is used, so any input H, W works, including odd ones that 'valid' pooling cut.

    Returns:
      A tensor shaped like reference, in the values' dtype.
    """

    def call(self, inputs):
        values, indices, reference = inputs
        output_shape = tf.shape(reference, out_type=tf.int64)
        flat = tf.scatter_nd(tf.reshape(indices, (-1, 1)), tf.reshape(values, (-1,)),
                             tf.reduce_prod(output_shape, keepdims=True))
        return tf.reshape(flat, output_shape)

    def compute_output_shape(self, input_shape):
        return input_shape[2]


# Receptive-field arithmetic. An interval (lo, hi) is the inclusive range of positions, along one
# axis, in a layer's *output* grid; each function returns the range in that layer's *input* grid that
# the outputs depend on. Image borders are ignored (an infinitely large image), which is the worst case
# a tiled inference halo must cover.

def interval_conv(interval, kernel_size=3):
    """A 'same' convolution with an odd ``kernel_size`` and stride 1."""
    lo, hi = interval
    return lo - kernel_size // 2, hi + kernel_size // 2


def interval_pool(interval, factor=2):
    """Pooling with window == stride == ``factor``: output p reads inputs factor*p .. factor*p+factor-1.
    """
    lo, hi = interval
    return factor * lo, factor * hi + factor - 1


def interval_upsample(interval, factor=2):
    """A transposed conv with kernel == stride == ``factor``, or an unpooling of the values: output p
    reads only input p // factor."""
    lo, hi = interval
    return lo // factor, hi // factor


def interval_union(*intervals):
    """Smallest interval containing all of ``intervals`` (a concat or any merge of paths)."""
    return min(lo for lo, _ in intervals), max(hi for _, hi in intervals)


def check_divisible(model_name, height, width, divisor):
    """Raise ValueError unless ``height`` and ``width`` are positive multiples of ``divisor``.

    The message names the model, the size given, the divisor and the nearest valid sizes, e.g.
    "unet needs H and W divisible by 16 (4 poolings by 2); got 100 x 64: height 100 -> use 96 or 112".
    """
    problems = []
    for label, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            problems.append(f"{label} {size!r} is not a positive integer")
        elif size % divisor:
            below = size // divisor * divisor
            above = below + divisor
            nearest = f"{below} or {above}" if below > 0 else f"{above}"
            problems.append(f"{label} {size} -> use {nearest}")
    if problems:
        raise ValueError(f"{model_name} needs input height and width divisible by {divisor}; got "
                         f"{height} x {width}: {'; '.join(problems)}")


def model_input(model_name, input_channels, input_size, divisor):
    """The ``keras.Input`` of a model: (None, None, C) when ``input_size`` is None (any size divisible
    by ``divisor`` at call time), else (H, W, C) checked by ``check_divisible``.

    Args:
      input_size: None, an int (square) or an (H, W) pair.
    """
    if (isinstance(input_channels, bool) or not isinstance(input_channels, numbers.Integral)
            or input_channels < 1):
        raise ValueError(f"input_channels {input_channels!r}: expected a positive integer")
    if input_size is None:
        return keras.Input((None, None, int(input_channels)), name="image")
    height, width = ((input_size, input_size) if isinstance(input_size, numbers.Integral)
                     else tuple(input_size))
    check_divisible(model_name, height, width, divisor)
    return keras.Input((int(height), int(width), int(input_channels)), name="image")
