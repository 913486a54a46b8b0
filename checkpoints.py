"""Checkpoints: save, find, resume, transfer, export.

A checkpoint is a folder (``<output_dir>/checkpoints/latest`` or ``.../best``) holding
  model.weights.h5   the model's weights (Keras' format, keyed by layer and variable name)
  optimizer.npz      the optimizer's variables, keyed by variable path (e.g. Adam/enc1_conv1_kernel_momentum)
  state.json         TrainState: step, epoch, best loss, early-stopping counters, history
  config.json        the run's resolved configuration (model name, classes, channels, ...)

    save_checkpoint(directory, model, optimizer, state, config_dict)    atomic
    find_checkpoint(path, prefer="latest" | "best", required=...)       the one lookup (trainer, inference)
    restore_checkpoint(directory, model, optimizer, config, channels)   resume, or transfer learning
    export_model(output_dir, config_dict)                               model.keras from the best checkpoint
    load_trained(path)                                                  a .keras file or checkpoint, ready
                                                                        to predict (inference, export)
    load_models(model=paths | checkpoint_filepath=paths)                LoadedModel list of an inference
                                                                        run (one, or an ensemble)
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import zipfile

import numpy as np

import image_io
import models
from errors import ConfigError, InferenceError, TrainingError

CHECKPOINT_FILES = ("model.weights.h5", "optimizer.npz", "state.json", "config.json")
WEIGHTS_FILE = "model.weights.h5"
# The input normalisation a model is trained with (normalization.py), recorded in its config.json
# so that inference can refuse an ensemble of models that expect different inputs. Models trained
# before it was recorded used this one too.
NORMALIZATION = "z-score per channel, statistics of the whole source image"


@dataclasses.dataclass
class TrainState:
    """What a checkpoint restores besides the weights (saved as state.json)."""
    step: int = 0
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    wall_time_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)  # test loss per epoch


def write_json(path, value):
    """``value`` as indented JSON, written beside ``path`` and renamed over it."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    image_io.atomic_write(path, lambda f: f.write(text), mode="w")


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def _keras_class_name(optimizer):
    """The Keras optimizer class ``optimizer`` is or derives from (e.g. LossScaleOptimizer)."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("keras."):
            return cls.__name__
    return type(optimizer).__name__


def optimizer_arrays(optimizer):
    """{key: numpy array} of the optimizer's variables, keyed by variable path with each optimizer's
    own (possibly auto-numbered, e.g. ``adam_1``) name replaced by its Keras class name."""
    owners = [optimizer] + ([optimizer.inner_optimizer] if hasattr(optimizer, "inner_optimizer") else [])
    arrays = {}
    for variable in optimizer.variables:
        key = variable.path
        for owner in owners:
            if key.startswith(owner.name + "/"):
                key = _keras_class_name(owner) + key[len(owner.name):]
                break
        if key in arrays:
            raise TrainingError(f"two optimizer variables share the path {key}; cannot checkpoint them by name")
        arrays[key] = np.asarray(variable.numpy())
    return arrays


def save_checkpoint(directory, model, optimizer, state, config_dict):
    """Write a checkpoint folder atomically: build it beside ``directory``, then swap it in
    (image_io.atomic_folder).

    The previous checkpoint is moved aside (scratch ".old") only once the new one is complete and
    removed after the swap, so a kill at any moment leaves a complete checkpoint (``find_checkpoint``
    falls back to the ``.old`` if the kill came between the two renames). Scratch of this checkpoint
    left by a killed save is removed first.
    """
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with image_io.atomic_folder(directory) as temporary:
        os.makedirs(temporary)
        model.save_weights(os.path.join(temporary, WEIGHTS_FILE))
        np.savez(os.path.join(temporary, "optimizer.npz"), **optimizer_arrays(optimizer))
        state_dict = dataclasses.asdict(state)
        if not math.isfinite(state.best_loss):  # no test pass yet; keep state.json strict JSON
            state_dict["best_loss"] = None
        write_json(os.path.join(temporary, "state.json"), state_dict)
        write_json(os.path.join(temporary, "config.json"), config_dict)
    shutil.rmtree(os.path.join(parent, f".{name}.old"), ignore_errors=True)  # left by older versions


# ----------------------------------------------------------------------------------------------
# Find
# ----------------------------------------------------------------------------------------------

def find_checkpoint(path, prefer="latest", required=CHECKPOINT_FILES):
    """The checkpoint folder meant by ``path``, or None.

    ``path`` is a checkpoint folder itself or an output folder; in an output folder
    ``checkpoints/<prefer>`` comes first, then the other one, each followed by its ``.old`` copy
    (left by a kill between the two renames of ``save_checkpoint``, image_io.moved_aside). The
    trainer resumes from ``latest``; inference and the export use ``best``.

    Args:
      required: the files a folder must hold to count.
    """
    other = {"latest": "best", "best": "latest"}[prefer]
    candidates = [path] + [str(old) for old in image_io.moved_aside(os.path.abspath(path))]
    for which in (prefer, other):
        folder = os.path.join(path, "checkpoints", which)
        candidates += [folder] + [str(old) for old in image_io.moved_aside(folder)]
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, f)) for f in required):
            return candidate
    return None


def output_dir_of(checkpoint_dir):
    """The output folder holding ``checkpoint_dir`` (…/checkpoints/<name>), or None."""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def read_config(directory):
    """The config.json of a checkpoint folder as a dict; ConfigError naming the file when it cannot
    be read (damaged by a full disk, edited by hand)."""
    return _read_json(os.path.join(directory, "config.json"))


def _read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read this checkpoint file ({type(exc).__name__}: {exc}); "
                          "use another checkpoint (checkpoints/best or checkpoints/latest)") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: not a checkpoint file (a JSON object was expected)")
    return value


def _load_weights(model, path):
    """model.load_weights(path); ConfigError naming the file when it is damaged or not weights."""
    try:
        model.load_weights(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot load these weights ({type(exc).__name__}: {str(exc)[:200]}); "
                          "use another checkpoint (checkpoints/best or checkpoints/latest)") from None


# ----------------------------------------------------------------------------------------------
# Resume and transfer learning
# ----------------------------------------------------------------------------------------------

def restore_checkpoint(directory, model, optimizer, config, input_channels, fine_tune=False):
    """Restore a checkpoint into ``model``/``optimizer``.

    Same number_classes: resume (weights, optimizer state, TrainState); with ``fine_tune`` (the run's
    databases are not the checkpoint's: database_differences) the weights only, batch-norm
    statistics included, and a fresh optimizer and TrainState: the old step count, learning-rate
    schedule, best test loss and early-stopping history belong to other data (a resumed step
    counter past --max_steps would train nothing, and the old best loss, measured on another test
    set, would decide which model is exported). Different number_classes: transfer learning
    (every layer but 'logits', fresh optimizer, fresh TrainState).
    Returns:
      (TrainState, resumed: bool)
    """
    saved = read_config(directory)
    check_compatible(directory, saved, config, input_channels)
    weights = os.path.join(directory, WEIGHTS_FILE)
    if saved["number_classes"] == config.number_classes and fine_tune:
        _load_weights(model, weights)
        print(f"fine-tuning from {directory}: every layer's weights restored; the optimizer state, step "
              "counter, learning-rate schedule, best test loss and early stopping start fresh", flush=True)
        return TrainState(), False
    if saved["number_classes"] == config.number_classes:
        # The learning rate is not restored: it is this run's flags. The schedule is a function of
        # the restored trainer step (state.json), so the run continues at the rate an uninterrupted
        # run has at that step; a constant rate is the --learning_rate of this run.
        state_path = os.path.join(directory, "state.json")
        try:
            state = TrainState(**_read_json(state_path))
        except TypeError as exc:
            raise ConfigError(f"{state_path}: not a checkpoint's state ({exc})") from None
        _load_weights(model, weights)
        load_optimizer(os.path.join(directory, "optimizer.npz"), optimizer)
        state.best_loss = math.inf if state.best_loss is None else state.best_loss
        print(f"resumed from {directory}: step {state.step}, epoch {state.epoch}, "
              f"best test loss {state.best_loss:.4g}", flush=True)
        return state, True
    source = models.build_from_config(dict(saved, input_channels=input_channels))
    _load_weights(source, weights)
    restored, skipped = transfer_weights(source, model)
    print(f"transfer learning from {directory} ({saved['number_classes']} -> {config.number_classes} "
          f"classes): restored {len(restored)} layers; not restored (fresh weights): {', '.join(skipped)}; "
          "optimizer, step and early-stopping history start fresh", flush=True)
    return TrainState(), False


# The network flags a run may leave unset (plan.AUTO_FLAGS) that a checkpoint's weights fix, with
# the values of checkpoints written before the flag existed.
NETWORK_FLAGS = {"base_filters": None, "unet_depth": 4}


def network_of_weights(config, saved):
    """``config`` with the network flags it left unset (config.self_configure) taken from the
    checkpoint whose config.json is ``saved``, and no longer self-configured."""
    fixed = {}
    for name, old_default in NETWORK_FLAGS.items():
        value = saved.get(name, old_default)
        if name in config.self_configure and value is not None:
            fixed[name] = value
    return dataclasses.replace(config, self_configure=[n for n in config.self_configure if n not in fixed], **fixed)


def check_compatible(directory, saved, config, input_channels, flag="--restore_checkpoint_filepath"):
    """ConfigError naming ``flag`` unless the checkpoint's network (config.json ``saved``) fits this run."""
    if saved.get("model") != config.model:
        raise ConfigError(f"{flag} {directory} holds a {saved.get('model')} model, not {config.model}")
    if flag == "--restore_checkpoint_filepath" and bool(saved.get("pretext")) != bool(config.pretext):
        # A pretext head regresses the image channels: taken for class logits when there are as many
        # classes as channels, it would be restored as if it were a segmentation head.
        raise ConfigError(
            f"{flag} {directory} is a pretraining checkpoint (pretrain_unet.py): start a segmentation run "
            "from it with --init_from" if saved.get("pretext") else
            f"{flag} {directory} is a segmentation run's checkpoint: pretrain_unet.py resumes pretraining runs only")
    wanted = {"base_filters": config.base_filters, "batch_norm": config.batch_norm, "input_channels": input_channels,
              "unet_depth": config.unet_depth, "upsampling": config.upsampling, "encoder": config.encoder}
    # Checkpoints written before --unet_depth/--upsampling/--encoder existed hold today's defaults.
    saved = dict({"unet_depth": 4, "upsampling": "transpose", "encoder": "plain"}, **saved)
    mismatched = {k: saved.get(k) for k, v in wanted.items() if saved.get(k) != v}
    if mismatched:
        raise ConfigError(
            f"{flag} {directory} was trained with "
            + ", ".join(f"{k}={v}" for k, v in mismatched.items()) + " but this run has "
            + ", ".join(f"{k}={wanted[k]}" for k in mismatched) + "; the same values are needed to restore it")


def complete_best(latest_dir, state):
    """Make checkpoints/best a copy of the resumed ``latest_dir`` when latest records its own test pass
    as the best but best holds an older one: a run killed (SIGKILL, out of memory, a lost node)
    between writing the two left it so, and the export, inference and --init_from read best.
    Returns True when it copied."""
    parent, name = os.path.split(os.path.abspath(latest_dir))
    if name != "latest" or os.path.basename(parent) != "checkpoints" or state.best_epoch != state.epoch \
            or not math.isfinite(state.best_loss):
        return False
    best = os.path.join(parent, "best")
    try:
        with open(os.path.join(best, "state.json")) as f:
            if json.load(f).get("epoch") == state.epoch:
                return False
    except (OSError, ValueError):
        pass  # missing or damaged: replaced below
    with image_io.atomic_folder(best) as temporary:
        shutil.copytree(latest_dir, temporary)
    print(f"{best}: replaced by a copy of {latest_dir}, the best test pass (epoch {state.epoch}); the run had "
          "stopped between writing the two", flush=True)
    return True


def load_optimizer(path, optimizer):
    """Assign optimizer.npz's arrays to the optimizer's variables by key; TrainingError naming the
    keys that differ (another optimizer, or --mixed_precision changed) before anything is assigned."""
    try:
        values = np.load(path)
        if not hasattr(values, "files"):  # a single .npy array, not an archive
            raise ValueError("not a .npz archive")
        with values:
            saved = {key: values[key] for key in values.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: cannot read this checkpoint file ({type(exc).__name__}: {exc}); "
                          "use another checkpoint (checkpoints/best or checkpoints/latest)") from None
    current = optimizer_arrays(optimizer)
    variables = dict(zip(current, optimizer.variables))
    if saved and all(key.startswith("arr_") for key in saved):
        # Checkpoints written before optimizer variables were keyed by path: positional.
        arrays = [saved[f"arr_{i}"] for i in range(len(saved))]
        if [a.shape for a in arrays] != [v.shape for v in current.values()]:
            raise TrainingError(f"{path} does not match this optimizer ({len(arrays)} arrays for "
                                f"{len(current)} variables); was --mixed_precision changed? Resume with "
                                "the original flags")
        saved = dict(zip(current, arrays))
    # The learning rate comes from this run's flags, never from the file: a constant rate is a
    # variable, a schedule has none, so switching between them is no mismatch (but is listed when
    # the optimizer differs anyway).
    learning_rate = {key for key in set(current) | set(saved) if key.endswith("/learning_rate")}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = sorted(k for k in set(current) & set(saved) - learning_rate if saved[k].shape != current[k].shape)
    if set(missing + unexpected + reshaped) - learning_rate:
        parts = []
        for label, keys in (("missing from the file", missing), ("not in this optimizer", unexpected),
                            ("of another shape", reshaped)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise TrainingError(f"{path} does not match this optimizer: variables " + "; ".join(parts)
                            + ". Was --optimizer or --mixed_precision changed? Resume with the original flags")
    for key, variable in variables.items():
        if key not in learning_rate:
            variable.assign(saved[key])


def initialise_from(directory, model, input_channels):
    """--init_from: copy every layer of the checkpoint in ``directory`` but the output head 'logits' into
    ``model`` (check_compatible has accepted it) and print which layers were and were not restored.
    Returns (restored names, skipped names)."""
    saved = read_config(directory)
    source = models.build_from_config(dict(saved, input_channels=input_channels))
    _load_weights(source, os.path.join(directory, WEIGHTS_FILE))
    restored, skipped = transfer_weights(source, model)
    if set(skipped) - {"logits"}:  # check_compatible passed, so a mismatch here is a fault, never silent
        raise TrainingError(f"--init_from {directory}: layers {', '.join(s for s in skipped if s != 'logits')} "
                            "of this run's network differ from the checkpoint's")
    what = f"a {saved['pretext'].get('task', 'pretext')} pretraining" if saved.get("pretext") else "a training run"
    print(f"initialised from {directory} ({what}): restored {len(restored)} layers ({', '.join(restored)}); "
          f"not restored (fresh weights): {', '.join(skipped) or 'none'}", flush=True)
    return restored, skipped


def transfer_weights(source, model):
    """Copy every layer's weights from ``source`` to the same-named layer of ``model`` except
    ``logits`` and layers whose shapes differ. Returns (restored names, skipped names)."""
    restored, skipped = [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            source_layer = None
        source_weights = source_layer.get_weights() if source_layer is not None else None
        if (layer.name == "logits" or source_weights is None
                or [w.shape for w in source_weights] != [tuple(w.shape) for w in layer.weights]):
            skipped.append(layer.name)
            continue
        layer.set_weights(source_weights)
        restored.append(layer.name)
    return restored, skipped


# ----------------------------------------------------------------------------------------------
# Load a trained model (inference.py, export_bioimageio.py)
# ----------------------------------------------------------------------------------------------

class ModelLoadError(Exception):
    """A trained model that cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass
class TrainedModel:
    """A trained network and where it came from."""
    model: object            # keras.Model
    name: str                # registry name ("unet", "segnet")
    config: dict | None      # the training config.json, None for a bare .keras file
    config_path: str | None
    source: str              # the file the weights came from (.keras or model.weights.h5)


def read_training_config(folders):
    """The first config.json found in ``folders`` as (dict, path), or (None, None)."""
    for folder in folders:
        path = os.path.join(folder, "config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    value = json.load(f)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read training config {path}: {exc}") from exc
            if not isinstance(value, dict):
                raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
            if value.get("pretext"):
                # Its output is a denoised image, not class logits: segmenting with it would write
                # masks of nothing without a word.
                raise ModelLoadError(
                    f"{path} describes a pretraining run (pretrain_unet.py, pretext task "
                    f"{value['pretext'].get('task')}): it does not segment; fine-tune it first with "
                    f"train_unet.py --init_from {os.path.dirname(path)}, then use that run's model")
            return value, path
    return None, None


def _registry_name(config, config_path, model, source):
    """The model's registry name: config.json's "model", else the name its builder gave the saved
    model (every registered builder names its keras.Model after itself); never guessed from layers."""
    if config is not None and "model" in config:
        if config["model"] not in models.MODEL_NAMES:
            raise ModelLoadError(f"{config_path}: model {config['model']!r} is not one of "
                                 f"{', '.join(models.MODEL_NAMES)}")
        return config["model"]
    if model is not None and model.name in models.MODEL_NAMES:
        return model.name
    raise ModelLoadError(
        f"cannot tell which model {source} is: it has no training config.json beside it and its name "
        f"{getattr(model, 'name', None)!r} is not one of {', '.join(models.MODEL_NAMES)}; put the "
        f"training config.json (with its \"model\" key) next to it")


def load_trained(path):
    """The trained model at ``path``: a .keras file (config.json beside it, when there is one), or a
    checkpoint folder holding model.weights.h5 (rebuilt from the config.json in it or in one of the
    two folders above it: <output>/checkpoints/<which>/). Raises ModelLoadError naming the file."""
    import keras

    path = os.fspath(path)
    if os.path.isfile(path):
        config, config_path = read_training_config([os.path.dirname(os.path.abspath(path))])
        if config is not None:  # an unknown "model" fails before the slow load
            _registry_name(config, config_path, None, path)
        if not zipfile.is_zipfile(path):
            # Keras says "File not found" for a file that exists but is no zip archive.
            raise ModelLoadError(f"cannot load model {path}: the file exists but cannot be read as a "
                                 f"Keras model (a .keras file is a zip archive; this one is not): it may "
                                 f"be damaged or incompletely copied; copy it again, or export it again "
                                 f"from its training output folder")
        models.register_layers()  # a SegNet's custom layers are found by their registered names
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for corrupt or foreign files.
            raise ModelLoadError(f"cannot load model {path}: it cannot be read as a Keras model and may "
                                 f"be damaged, or was saved by another program "
                                 f"({type(exc).__name__}: {exc})") from exc
        return TrainedModel(model, _registry_name(config, config_path, model, path), config, config_path, path)

    parent = os.path.dirname(os.path.abspath(path))
    config, config_path = read_training_config([path, parent, os.path.dirname(parent)])
    if config is None:
        raise ModelLoadError(f"no config.json found for checkpoint {path} (looked in it and the two "
                             f"folders above it); it is needed to rebuild the model")
    name = _registry_name(config, config_path, None, path)
    missing = [key for key in models.CONFIG_KEYS if key not in config]
    if missing:
        raise ModelLoadError(f"{config_path} lacks {', '.join(missing)} (needed to rebuild the model)")
    weights = os.path.join(path, WEIGHTS_FILE)
    try:
        model = models.build_from_config(config)
        model.load_weights(weights)
    except Exception as exc:  # h5py/Keras errors for truncated or mismatched weight files.
        raise ModelLoadError(f"cannot load weights {weights} into the {name} described by "
                             f"{config_path}: {exc}") from exc
    return TrainedModel(model, name, config, config_path, weights)


# ----------------------------------------------------------------------------------------------
# Load the models of an inference run (inference.py, export_bioimageio.py)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """A ready model plus what inference needs to know about it."""
    model: object  # keras.Model
    name: str
    number_classes: int
    input_channels: int
    training_tile_size: int | None
    source: str
    options: dict  # shape options (e.g. unet_depth)
    geometry: models.Geometry  # size divisor, halo, smallest tile: from name and options, once


def _resolve_checkpoint_dir(path):
    """A directory holding model.weights.h5: ``path`` itself or, for an output folder, its best
    checkpoint (the one model.keras is exported from), else its latest."""
    found = find_checkpoint(str(path), prefer="best", required=(WEIGHTS_FILE,))
    if found is None:
        raise InferenceError(
            f"checkpoint not found: {path} holds neither model.weights.h5 nor "
            f"checkpoints/best|latest/model.weights.h5 (expected a checkpoint directory or a training "
            f"output folder)")
    return pathlib.Path(found)


def load_model(model=None, checkpoint_filepath=None):
    """Load the one model at ``model`` (a .keras file or a training output folder holding model.keras)
    or ``checkpoint_filepath`` (a checkpoint folder or a training output folder); load_models checks
    that exactly one is given, and gives each member of an ensemble in turn.

    Returns:
      LoadedModel. Raises InferenceError naming the path when anything is missing or unreadable.
    """
    if model is not None:
        path = pathlib.Path(model)
        keras_path = path / "model.keras" if path.is_dir() else path
        if not keras_path.is_file():
            hint = (" (this folder has checkpoints/: use --checkpoint_filepath)"
                    if (path / "checkpoints").is_dir() else "")
            raise InferenceError(f"model not found: {keras_path} (expected a .keras file or a training "
                                 f"output folder holding model.keras){hint}")
        source = keras_path
    else:
        source = _resolve_checkpoint_dir(checkpoint_filepath)
    try:
        trained = load_trained(source)
    except ModelLoadError as exc:
        raise InferenceError(str(exc)) from exc
    network, name, training_config, source = trained.model, trained.name, trained.config, trained.source

    tile = training_config.get("tile_size") if training_config else None
    # Depth changes the size divisor and the halo: from config.json, else from the model itself.
    options = ({key: training_config[key] for key in models.OPTION_KEYS if key in training_config}
               if training_config else models.options_of(network))
    try:
        geometry = models.geometry(name, **options)
    except ValueError as exc:
        if training_config is None:
            # The options were read from the model's layers, not given by anyone: a message naming
            # a flag (e.g. "--unet_depth 0") would blame a flag the user never gave.
            raise InferenceError(
                f"{source} is not a model trained by this tool: it is named {name!r}, but its layers "
                f"are not those of this tool's {models.display_name(name)}. Inference needs the "
                f"model.keras that train_unet.py / train_segnet.py export into their output folder "
                f"(with its config.json), or such a folder's checkpoint (--checkpoint_filepath)") from exc
        raise InferenceError(f"{source}: {exc}") from exc
    return LoadedModel(model=network, name=name, number_classes=int(network.output_shape[-1]),
                       input_channels=int(network.input_shape[-1]),
                       training_tile_size=int(tile) if tile else None, source=source, options=options,
                       geometry=geometry)

def _recorded_normalization(source):
    """The "normalization" entry of the training config.json beside a loaded model; a model without
    one (trained before it was recorded, or a bare .keras file) used NORMALIZATION."""
    folder = pathlib.Path(source).parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "config.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return json.loads(path.read_text()).get("normalization", NORMALIZATION)
            return None
    return NORMALIZATION


def load_models(model=None, checkpoint_filepath=None):
    """Every model of an inference run: ``model`` or ``checkpoint_filepath`` (exactly one), each a path
    or a list of paths (the members of an ensemble), checked to be compatible.

    Returns:
      list of LoadedModel. Raises InferenceError when a member cannot be loaded, or when members
      differ in classes, input channels, architecture (halo and size divisor) or normalisation.
    """
    if (model is None) == (checkpoint_filepath is None):
        raise InferenceError("give exactly one of --model and --checkpoint_filepath")
    flag, paths = (("--model", model) if model is not None
                   else ("--checkpoint_filepath", checkpoint_filepath))
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise InferenceError(f"{flag}: no path given")
    loaded = []
    for path in paths:
        loaded.append(load_model(model=str(path)) if flag == "--model"
                      else load_model(checkpoint_filepath=str(path)))
    first = loaded[0]
    for other in loaded[1:]:
        for what, value in [("classes", lambda m: m.number_classes),
                            ("input channels", lambda m: m.input_channels),
                            ("architecture", lambda m: (m.name, models.model_options(m.name, **m.options))),
                            ("normalisation", lambda m: _recorded_normalization(m.source))]:
            if value(other) != value(first):
                raise InferenceError(
                    f"{flag}: ensemble members differ in {what}: {first.source} has {value(first)!r}, "
                    f"{other.source} has {value(other)!r}; an ensemble averages the softmax of models "
                    f"trained for the same task (same classes, channels and architecture)")
    return loaded


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def export_model(output_dir, config_dict):
    """Save the best checkpoint's weights (else latest's) as output_dir/model.keras: float32, loads
    without the training code after ``import models``, named after its registry model (the model's
    name, and ``config.json`` beside it, say which model it is). Returns its path."""
    import keras

    checkpoint = find_checkpoint(output_dir, prefer="best", required=(WEIGHTS_FILE,))
    # Build outside the strategy and in float32 so the file holds plain variables that load
    # anywhere, whatever --mixed_precision and towers were used for training.
    keras.mixed_precision.set_global_policy("float32")
    model = models.build_from_config(config_dict)
    model.load_weights(os.path.join(checkpoint, WEIGHTS_FILE))
    path = os.path.join(output_dir, "model.keras")
    image_io.remove_stale_scratch(output_dir, target="model.keras")
    image_io.atomic_write(path, model.save, mode=None)
    return path


def copy_previous_run(source_dir, output_dir):
    """Resuming into a new output folder: start its CSVs from the old run's (truncated later) and
    take its checkpoints/best, so the exported model.keras is the best of the whole history even if
    this run never beats it. Nothing already in ``output_dir`` is replaced."""
    os.makedirs(output_dir, exist_ok=True)
    for name in ("train_loss.csv", "test_metrics.csv"):
        if os.path.exists(os.path.join(source_dir, name)) and not os.path.exists(os.path.join(output_dir, name)):
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(output_dir, name))
    best = find_checkpoint(os.path.join(source_dir, "checkpoints", "best"))
    target = os.path.join(output_dir, "checkpoints", "best")
    if best is not None and find_checkpoint(target) is None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Copied beside the target and swapped into place, like save_checkpoint.
        with image_io.atomic_folder(target) as temporary:
            shutil.copytree(best, temporary)


def database_fingerprint(metadata):
    """A short hash of a database's metadata (records, shapes, classes, sources): equal for copies of
    one database, different for another one."""
    return hashlib.sha1(json.dumps(metadata, sort_keys=True, default=str).encode()).hexdigest()[:16]


def database_differences(checkpoint_dir, saved, config, fingerprints):
    """Warnings for the databases of this run that are not those the checkpoint was trained on.

    Args:
      saved: the checkpoint's config.json; fingerprints: {"train": ..., "test": ...} of this run.
    Compared by fingerprint (a copy elsewhere, e.g. on node-local scratch, is the same database);
    checkpoints written before fingerprints were recorded are compared by path.
    """
    warnings = []
    for role in ("train", "test"):
        path, old_path = getattr(config, f"{role}_database"), saved.get(f"{role}_database")
        old_fingerprint = saved.get(f"{role}_database_fingerprint")
        if old_fingerprint is not None:
            differs = old_fingerprint != fingerprints[role]
        else:
            differs = old_path is not None and os.path.abspath(old_path) != os.path.abspath(path)
        if differs:
            warnings.append(f"warning: --{role}_database {path} is not the database the checkpoint was trained "
                            f"on ({old_path}, recorded in {os.path.join(checkpoint_dir, 'config.json')}); "
                            "a new run starts from the checkpoint's weights (fine-tuning, see "
                            "docs/sparse-labels.md)")
    return warnings
