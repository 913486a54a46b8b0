"""Segmentation networks: ``build_model(name, ...)`` for name in ``MODEL_NAMES``.

Importing this package registers the custom SegNet layers with Keras, so a saved ``.keras`` model
loads with ``keras.saving.load_model`` after ``import models``.
"""
from models import segnet, unet
from models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D, check_divisible

MODEL_NAMES = ("unet", "segnet")
SIZE_DIVISOR = {"unet": unet.SIZE_DIVISOR, "segnet": segnet.SIZE_DIVISOR}

__all__ = ["MODEL_NAMES", "SIZE_DIVISOR", "MaxPoolingWithArgmax2D", "MaxUnpooling2D", "build_model",
           "check_input_size", "receptive_field"]


def _check_name(name):
    if name not in MODEL_NAMES:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODEL_NAMES)}")


def build_model(name, number_classes, input_channels=1, base_filters=64, input_size=None,
                batch_norm=True):
    """Build the network ``name`` ("unet" or "segnet"); see ``models.unet.build_unet`` for the
    arguments. Returns a keras.Model mapping float32 (B, H, W, C) to float32 logits
    (B, H, W, number_classes)."""
    _check_name(name)
    builder = unet.build_unet if name == "unet" else segnet.build_segnet
    return builder(number_classes, input_channels=input_channels, base_filters=base_filters,
                   input_size=input_size, batch_norm=batch_norm)


def check_input_size(name, height, width):
    """Raise ValueError unless an H x W input suits model ``name`` (both divisible by
    ``SIZE_DIVISOR[name]``); the message gives the divisor and the nearest valid sizes."""
    _check_name(name)
    check_divisible(name, height, width, SIZE_DIVISOR[name])


def receptive_field(name):
    """Theoretical receptive field of model ``name`` in input pixels: the side of the largest square of
    input pixels one output pixel depends on (ignoring image borders): 204 for unet, 404 for segnet.
    The range sits off-centre by less than one pooling period, so a tile whose origin is a multiple of
    ``SIZE_DIVISOR[name]`` predicts exactly what the whole image would beyond
    ``receptive_field(name) // 2 + SIZE_DIVISOR[name]`` pixels from its edges (107 and 211 suffice).
    See ``models.unet.receptive_field`` for the method."""
    _check_name(name)
    return unet.receptive_field() if name == "unet" else segnet.receptive_field()
