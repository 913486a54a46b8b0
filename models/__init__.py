"""Segmentation networks and the one registry of them.

Each model is one module ``models/<name>.py`` exporting:
  build(number_classes, input_channels=1, base_filters=64, input_size=None, batch_norm=True)
      -> keras.Model named <name> (float32 (B, H, W, C) -> float32 logits (B, H, W, number_classes))
  SIZE_DIVISOR      H and W must be multiples of it (the product of the pooling factors)
  receptive_field() side in input pixels of what one output pixel sees (see models.unet)
  XLA_PROBLEM       None if XLA can compile the model, else why not (shown when --xla is refused)
Adding a model is that file plus its name in ``MODEL_NAMES``; the trainer, the ``--xla`` check,
inference and launch_train_sbatch.sh read this registry.

Importing this package registers the custom SegNet layers with Keras, so a saved ``.keras`` model
loads with ``keras.saving.load_model`` after ``import models``.
"""
import importlib

from models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D, check_divisible

MODEL_NAMES = ("unet", "segnet")
_MODULES = {name: importlib.import_module(f"models.{name}") for name in MODEL_NAMES}
SIZE_DIVISOR = {name: module.SIZE_DIVISOR for name, module in _MODULES.items()}
# The training-config keys that describe a network; build_from_config needs exactly these.
CONFIG_KEYS = ("model", "number_classes", "input_channels", "base_filters", "batch_norm")

__all__ = ["CONFIG_KEYS", "MODEL_NAMES", "SIZE_DIVISOR", "MaxPoolingWithArgmax2D", "MaxUnpooling2D",
           "build_from_config", "build_model", "check_input_size", "check_name", "receptive_field",
           "xla_problem"]


def check_name(name):
    """Raise ValueError unless ``name`` is a registered model."""
    if name not in _MODULES:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODEL_NAMES)}")


def build_model(name, number_classes, input_channels=1, base_filters=64, input_size=None,
                batch_norm=True):
    """Build the registered network ``name``; see ``models.unet.build_unet`` for the arguments.
    Returns a keras.Model named ``name`` mapping float32 (B, H, W, C) to float32 logits
    (B, H, W, number_classes)."""
    check_name(name)
    return _MODULES[name].build(number_classes, input_channels=input_channels, base_filters=base_filters,
                                input_size=input_size, batch_norm=batch_norm)


def build_from_config(config):
    """The network a training ``config.json`` dict describes (``CONFIG_KEYS``); KeyError/ValueError
    when a key is missing or the model is unknown."""
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise KeyError(f"lacks {', '.join(missing)} (needed to rebuild the model)")
    return build_model(config["model"], int(config["number_classes"]),
                       input_channels=int(config["input_channels"]),
                       base_filters=int(config["base_filters"]), batch_norm=bool(config["batch_norm"]))


def check_input_size(name, height, width):
    """Raise ValueError unless an H x W input suits model ``name`` (both divisible by
    ``SIZE_DIVISOR[name]``); the message gives the divisor and the nearest valid sizes."""
    check_name(name)
    check_divisible(name, height, width, SIZE_DIVISOR[name])


def receptive_field(name):
    """Theoretical receptive field of model ``name`` in input pixels: the side of the largest square of
    input pixels one output pixel depends on (ignoring image borders): 204 for unet, 404 for segnet.
    The range sits off-centre by less than one pooling period, so a tile whose origin is a multiple of
    ``SIZE_DIVISOR[name]`` predicts exactly what the whole image would beyond
    ``receptive_field(name) // 2 + SIZE_DIVISOR[name]`` pixels from its edges (107 and 211 suffice).
    See ``models.unet.receptive_field`` for the method."""
    check_name(name)
    return _MODULES[name].receptive_field()


def xla_problem(name):
    """None if XLA can compile model ``name``, else the reason it cannot."""
    check_name(name)
    return _MODULES[name].XLA_PROBLEM
