"""Segmentation networks and the one registry of them.

Each model is one module ``models/<name>.py`` exporting:
  build(number_classes, input_channels=1, base_filters=64, input_size=None, batch_norm=True, **options)
      -> keras.Model named <name> (float32 (B, H, W, C) -> float32 logits (B, H, W, number_classes))
  SIZE_DIVISOR      H and W must be multiples of it (the product of the pooling factors) at the default
                    options; ``size_divisor(**options)`` when the options change it
  receptive_field(**options)  side in input pixels of what one output pixel sees (see models.unet)
  XLA_PROBLEM       None if XLA can compile the model, else why not (shown when --xla is refused)
  PRECISION_PROBLEM None if the model may compute in bfloat16 / float16 for inference, else why not
  DISPLAY_NAME      how people write its name ("UNet"), for model cards
  CITATION          (reference text, DOI) of the architecture's paper, cited by exported packages
  OPTIONS           optional: {training-config key: (builder argument, default)} of the options that
                    shape the network (UNet: unet_depth -> depth, upsampling)
Adding a model is that file plus its name in ``MODEL_NAMES``; the trainer, the ``--xla`` check,
inference, the bioimage.io export and launch_train_sbatch.sh read this registry.

The functions that depend on a network's shape (``size_divisor``, ``receptive_field``,
``check_input_size``, ``build_model``) take the options as keyword arguments under their config keys,
so a whole training config.json can be passed: ``models.size_divisor(name, **config)``; keys that do
not shape model ``name`` are ignored, missing ones take the default (config.json files written before
the options existed rebuild the network they describe).

A model's module (and with it TensorFlow) is imported when that model is first asked for, so
``import models`` alone is free. A saved ``.keras`` SegNet holds custom layers that Keras finds by
their registered names once ``register_layers()`` has run (checkpoints.load_trained calls it).
"""
import dataclasses
import importlib
import math

MODEL_NAMES = ("unet", "segnet")
# The training-config keys that every network needs; build_from_config needs exactly these (plus
# the optional shape options of OPTION_KEYS, which default to today's networks).
CONFIG_KEYS = ("model", "number_classes", "input_channels", "base_filters", "batch_norm")

__all__ = ["CONFIG_KEYS", "MODEL_NAMES", "OPTION_KEYS", "SIZE_DIVISOR", "build_from_config", "build_model",
           "check_input_size", "check_name", "check_options", "citation", "display_name", "Geometry",
           "geometry", "model_options", "options_of", "receptive_field", "register_layers", "shape_options",
           "size_divisor", "with_precision", "xla_problem"]

# Precisions a model can compute in, with their Keras dtype policies (variables stay float32).
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def __getattr__(attribute):
    """SIZE_DIVISOR ({name: divisor at the default options}; size_divisor(name, **config) for the
    others) and OPTION_KEYS (the training-config keys of every model's shape options), read from the
    model modules when first asked for."""
    if attribute == "SIZE_DIVISOR":
        return {name: _module(name).SIZE_DIVISOR for name in MODEL_NAMES}
    if attribute == "OPTION_KEYS":
        return _option_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def _module(name):
    """The module of model ``name``, imported on first use (importlib keeps it after that)."""
    check_name(name)
    return importlib.import_module(f"models.{name}")


def _modules():
    return {name: _module(name) for name in MODEL_NAMES}


def _option_keys():
    return tuple(sorted({key for module in _modules().values() for key in getattr(module, "OPTIONS", {})}))


def register_layers():
    """Register the custom layers (SegNet's argmax pooling) with Keras, so that
    ``keras.saving.load_model`` reads a saved model without custom_objects. Imports TensorFlow."""
    importlib.import_module("models.layers")


def check_name(name):
    """Raise ValueError unless ``name`` is a registered model."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODEL_NAMES)}")


def model_options(name, **config):
    """The builder keyword arguments of model ``name`` from config keys (defaults filled in; keys of
    other models and None values ignored), e.g. unet: {"depth": 4, "upsampling": "transpose"}."""
    options = {}
    for key, (argument, default) in getattr(_module(name), "OPTIONS", {}).items():
        value = config.get(key)
        options[argument] = default if value is None else value
    return options


def shape_options(config):
    """The shape options (``OPTION_KEYS``) of a training config, a TrainConfig or a config.json dict:
    the one place that knows which config keys shape a network; None for a key the config lacks."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return {key: get(key) for key in _option_keys()}


def check_options(name, **config):
    """ValueError naming the flag when a shape option cannot be built, or is set away from its default
    for a model it does not apply to (e.g. --unet_depth 3 with segnet)."""
    own = getattr(_module(name), "OPTIONS", {})
    for module_name, module in _modules().items():
        for key, (_, default) in getattr(module, "OPTIONS", {}).items():
            value = config.get(key)
            if key not in own and value is not None and value != default:
                raise ValueError(f"--{key} {value} applies to {module_name} only, not to {name}; leave it "
                                 f"at its default ({default})")
    if hasattr(_module(name), "check_options"):
        _module(name).check_options(**model_options(name, **config))


def build_model(name, number_classes, input_channels=1, base_filters=64, input_size=None,
                batch_norm=True, **options):
    """Build the registered network ``name``; see ``models.unet.build_unet`` for the arguments and
    ``OPTION_KEYS`` for ``options`` (e.g. unet_depth=3, upsampling="bilinear").
    Returns a keras.Model named ``name`` mapping float32 (B, H, W, C) to float32 logits
    (B, H, W, number_classes)."""
    check_options(name, **options)
    return _module(name).build(number_classes, input_channels=input_channels, base_filters=base_filters,
                                input_size=input_size, batch_norm=batch_norm,
                                **model_options(name, **options))


def build_from_config(config):
    """The network a training ``config.json`` dict describes (``CONFIG_KEYS``, and ``OPTION_KEYS`` when
    present); KeyError/ValueError when a key is missing or the model is unknown."""
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise KeyError(f"lacks {', '.join(missing)} (needed to rebuild the model)")
    return build_model(config["model"], int(config["number_classes"]),
                       input_channels=int(config["input_channels"]),
                       base_filters=int(config["base_filters"]), batch_norm=bool(config["batch_norm"]),
                       **{key: config[key] for key in _option_keys() if key in config})


def size_divisor(name, **config):
    """H and W of model ``name`` with these shape options must be multiples of this (16 for the
    default unet, 8 for unet_depth=3, 32 for segnet)."""
    check_options(name, **config)
    module = _module(name)
    if hasattr(module, "size_divisor"):
        return module.size_divisor(**model_options(name, **config))
    return module.SIZE_DIVISOR


def check_input_size(name, height, width, **config):
    """Raise ValueError unless an H x W input suits model ``name`` with these shape options (both
    divisible by ``size_divisor(name, **config)``); the message gives the divisor and the nearest
    valid sizes."""
    # Here, not at the top: models.layers imports TensorFlow, which `import models` must not.
    from models.layers import check_divisible

    check_divisible(name, height, width, size_divisor(name, **config))


def receptive_field(name, **config):
    """Theoretical receptive field of model ``name`` in input pixels: the side of the largest square of
    input pixels one output pixel depends on (ignoring image borders): 204 for the default unet, 404 for
    segnet (see ``models.unet.receptive_field`` for other depths and the upsampling kinds).
    The range sits off-centre by less than one pooling period, so a tile whose origin is a multiple of
    ``size_divisor(name, **config)`` predicts exactly what the whole image would beyond
    ``receptive_field(name, **config) // 2 + size_divisor(name, **config)`` pixels from its edges
    (107 and 211 suffice at the defaults). See ``models.unet.receptive_field`` for the method."""
    check_options(name, **config)
    return _module(name).receptive_field(**model_options(name, **config))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What tiling needs to know of one network with its shape options (``geometry`` computes it once).

    name: registry name ("unet"), for messages.
    size_divisor: H and W of the network input must be multiples of it.
    receptive_field: side in input pixels of what one output pixel sees.
    halo: context dropped on each inner side of a tile, in pixels (see ``geometry``).
    smallest_tile: the smallest tile side that keeps a centre: two halos plus one pooling period.
    """
    name: str
    size_divisor: int
    receptive_field: int
    halo: int
    smallest_tile: int


def geometry(name, **config):
    """The Geometry of model ``name`` with these shape options (config keys, as ``size_divisor``);
    ValueError naming the flag when the options cannot be built.

    The halo: an output pixel depends on a receptive-field-wide input range that can sit off-centre
    by up to one pooling period (``receptive_field``), so half of it plus the size divisor is enough;
    rounding up to the divisor keeps tile origins on the network's pooling grid, without which tiles
    would not reproduce the whole-image result.
    """
    divisor, field = size_divisor(name, **config), receptive_field(name, **config)
    halo = math.ceil((field // 2 + divisor) / divisor) * divisor
    return Geometry(name=name, size_divisor=divisor, receptive_field=field, halo=halo,
                    smallest_tile=2 * halo + divisor)


def options_of(model):
    """The shape options (config keys of ``OPTION_KEYS``) of a built registry model, read from the
    model itself: what ``size_divisor(model.name, **options_of(model))`` needs when only a .keras file
    is at hand. Empty for a model without options."""
    module = _module(model.name)
    return module.options_of(model) if hasattr(module, "options_of") else {}


def with_precision(model, precision):
    """A copy of the built ``model`` (same layers, same weights) computing in ``precision``, a key of
    ``PRECISIONS``; ``model`` itself when every layer already computes in it.

    The output layer "logits" computes in float32 whatever the precision, as the builders make it
    (the softmax and the loss need float32), so the copy's outputs are float32 logits either way.
    """
    import keras

    if precision != "float32" and _module(model.name).PRECISION_PROBLEM:
        raise ValueError(f"{display_name(model.name)} cannot compute in {precision}: "
                         f"{_module(model.name).PRECISION_PROBLEM}")
    if all(layer.dtype_policy.compute_dtype == ("float32" if layer.name == "logits" else precision)
           for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)):
        return model

    def in_precision(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer.name == "logits" else PRECISIONS[precision]
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=in_precision)
    copy.set_weights(model.get_weights())
    return copy


def xla_problem(name):
    """None if XLA can compile model ``name``, else the reason it cannot."""
    return _module(name).XLA_PROBLEM


def display_name(name):
    """How people write model ``name`` ("UNet", "SegNet")."""
    return _module(name).DISPLAY_NAME


def citation(name):
    """(reference text, DOI) of the paper that introduced architecture ``name``."""
    return _module(name).CITATION
