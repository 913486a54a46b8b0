"""The trainer's command line and configuration: every flag declared once, as a TrainConfig field.

    build_parser(model) -> argparse parser     config_from_args(model, args) -> TrainConfig
    read_database_metadata(path, role)         validate_config(config, train_meta, test_meta)
    run_length(config, steps_per_epoch)        optimizer_settings(config, steps_per_epoch)

Each field of ``TrainConfig`` carries its flag in its metadata (help text, type, choices; see
flags.py); the parser is generated from the fields, so a new flag is one field and its default is
written once (help texts show it through ``%(default)s``). The augmentation flags are the fields of
augment.AugmentationConfig, built by the same code (flags.add_flags).
"""
import argparse
import dataclasses
import math
import os

import lmdb

import augment
import flags
import models
import optim
import plan
import records
import steps
from errors import ConfigError
from flags import flag


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs, as plain values (see the help texts for meanings)."""
    model: str
    train_database: str = flag("LMDB folder of training records", required=True)
    test_database: str = flag("LMDB folder of test records (evaluated every epoch)", required=True)
    output_dir: str = flag("folder for config.json, CSVs, plots, tensorboard/, checkpoints/ and model.keras "
                           "(created; resuming into it appends to the CSVs)", required=True)
    batch_size: int = flag("images per tower per step (default %(default)s); the effective batch is "
                           "batch_size x towers x workers", 4, kind=int)
    number_classes: int = flag("classes including background 0 (default %(default)s)", 2, kind=int)
    tile_size: int = flag("training crop size in pixels (default %(default)s; divisible "
                          "by {divisors})", 256, kind=int)
    learning_rate: float = flag("peak learning rate (default %(default)g), reached after --warmup_steps", 1e-3,
                                kind=float)
    optimizer: str = flag("adam, adamw (decoupled weight decay) or sgd (with --momentum, --nesterov) "
                          "(default %(default)s)", "adam", choices=optim.OPTIMIZERS)
    weight_decay: float = flag("decoupled weight decay per step, times the learning rate (adamw, sgd; "
                               "default %(default)g)", 0.0, kind=float)
    momentum: float = flag("SGD momentum (default %(default)g, nnU-Net's)", 0.99, kind=float)
    nesterov: bool = flag("Nesterov momentum for SGD (default %(default)s)", True, kind="binary")
    lr_schedule: str = flag("learning rate over the run: constant, cosine or poly ((1 - t)^0.9, nnU-Net's) "
                            "decay to 0 at the run's end (--max_steps, or --max_epochs x steps per epoch) "
                            "(default: poly when the run has a length, constant when only early stopping "
                            "ends it)", choices=optim.SCHEDULES)
    warmup_steps: int = flag("linear learning-rate warm-up over the first N steps (default: 10%% of the run "
                             "length with a decaying schedule, else 0)", kind=int)
    max_steps: int = flag("stop after this many gradient steps (a test pass comes last); the run length "
                          "of --lr_schedule (default: --max_epochs x steps per epoch)", kind=int)
    time_budget: str = flag(
        "wall time for the whole run, like 90s, 45m, 2h or 1d: the trainer measures its step and test-pass "
        "times and sets --max_steps and the test spacing so training, test passes and the export fit "
        "(see docs/planning.md; not with --max_steps or --max_epochs)")
    foreground_crop_fraction: float = flag(
        "share of training crops placed on a pixel of a foreground class drawn uniformly from the classes "
        "in the record (with jitter); the others are uniform random crops (default %(default)g, nnU-Net's "
        "third)", 0.33, kind=float)
    unet_depth: int = flag("UNet levels (poolings); the size divisor is 2^depth and the receptive field "
                           "shrinks with it (default %(default)s)", 4, kind=int)
    upsampling: str = flag("UNet decoder upsampling: 2x2 transposed conv, or bilinear x2 + 3x3 conv "
                           "(NVIDIA's TinyUNet) (default %(default)s)", "transpose",
                           choices=("transpose", "bilinear"))
    encoder: str = flag("UNet encoder levels and bottleneck: two conv-BN-ReLU (plain), or the same two convs "
                        "as a residual block with a 1x1 shortcut (nnU-Net's ResEnc block, one per level) "
                        "(default %(default)s; see docs/planning.md for its measurement)", "plain",
                        choices=("plain", "residual"))
    test_every_n_steps: int = flag("gradient steps between test passes (one 'epoch'); default: one "
                                   "pass over the training database", kind=int)
    early_stopping: int = flag("stop after this many epochs without a lower test loss (default "
                               "%(default)s)", 10, kind=int)
    gradient_update_location: str = flag("where tower gradients are summed: cpu, gpu:N or nccl (default "
                                         "gpu:0 with GPUs, else cpu); one worker only: several workers "
                                         "always sum with a collective all-reduce")
    restore_checkpoint_filepath: str = flag(
        "resume from a checkpoint folder or an output folder (its checkpoints/latest); with other "
        "databases than the checkpoint's, fine-tune: only the weights are restored, the step count, "
        "optimizer, schedule and early stopping restart; a checkpoint with another number_classes is "
        "used for transfer learning (all layers but 'logits')")
    init_from: str = flag(
        "start from the weights of a pretrain_unet.py output folder (its checkpoints/best) or checkpoint "
        "folder: every layer but the output head 'logits', which starts fresh; the model, --base_filters, "
        "--batch_norm, --unet_depth, --upsampling, --encoder and the channel count must be those it was pretrained "
        "with. Ignored when --restore_checkpoint_filepath resumes a run")
    reader_count: int = flag("reader processes per tower (default %(default)s)", 1, kind=int)
    use_augmentation: bool = flag("augment training images (default %(default)s)", True, kind="binary")
    balance_classes: bool = flag("sample training records so every class is equally represented "
                                 "(default %(default)s)", False, kind="binary")
    seed: int = flag("seed for weights and sampling (default %(default)s)", 0, kind=int)
    base_filters: int = flag("feature depth of the first level (default %(default)s)", 64, kind=int)
    batch_norm: bool = flag("batch normalisation after each convolution (default %(default)s)", True,
                            kind="binary")
    max_epochs: int = flag("stop after this many test passes (default: only early stopping)", kind=int)
    gpus: str = flag("GPUs to train on: 'all' (default), 'none' or indices like '0,1'")
    cpu_towers: int = flag("train on the CPU split into N logical devices, one tower each (ignores GPUs)",
                           kind=int)
    mixed_precision: str = flag(
        "compute in float16 with dynamic loss scaling (also what a bare --mixed_precision means), or in "
        "bfloat16 (no loss scaling needed; what Ampere/Hopper GPUs and recent CPUs run fastest); the "
        "weights and the loss stay float32 (default: float32 throughout)",
        choices=steps.MIXED_PRECISIONS, const="float16")
    xla: bool = flag("compile the replica step with XLA (not for {no_xla})", False, action="store_true")
    loss: str = flag("cross-entropy, soft Dice over the foreground classes, or their sum (default "
                     "%(default)s; the Dice term keeps small and rare classes from being ignored); "
                     "ce+dice+skeleton adds skeleton recall, for thin structures such as vessels, membranes "
                     "and filaments", "ce+dice",
                     choices=steps.LOSSES)
    log_every_n_steps: int = flag("print one progress line every N steps (default %(default)s)", 10, kind=int)
    # The flags of plan.AUTO_FLAGS not given on the command line: a --time_budget run sets them from
    # the data and the machine (docs/planning.md), a resumed planned run takes them from its
    # checkpoint; any other run keeps the defaults above. Not compared: how a value came about does
    # not change the configuration.
    self_configure: list = dataclasses.field(default_factory=list, compare=False)
    # Resolved from the augmentation flags by augment.py (defaults < --augmentation_config < flags);
    # config.json holds it as a dict of its fields.
    augmentation: augment.AugmentationConfig = dataclasses.field(default_factory=augment.AugmentationConfig)
    # pretrain_unet.py: the pretext task's settings (pretext.PretextConfig as a dict); None = segmentation.
    pretext: dict = None

    def __post_init__(self):
        if self.lr_schedule is None:
            # Decay needs the run's length; a run ended by early stopping alone keeps a constant rate.
            self.lr_schedule = "poly" if (self.max_steps or self.max_epochs or self.time_budget) else "constant"
        if isinstance(self.augmentation, dict):  # as config.json records it
            self.augmentation = augment.AugmentationConfig(**self.augmentation)
        # Code written when --mixed_precision was an on/off switch passes True / False.
        if self.mixed_precision is True:
            self.mixed_precision = "float16"
        elif self.mixed_precision is False:
            self.mixed_precision = None


def build_parser(model_name, exclude=(), prog=None, description=None):
    """The argparse parser of train_<model_name>.py, generated from TrainConfig's fields (without the
    flags named in ``exclude``: pretrain_unet.py has no labels, so no --loss, --number_classes, ...)
    and AugmentationConfig's."""
    parser = argparse.ArgumentParser(
        prog=prog or f"train_{model_name}.py",
        description=description or f"Train a {model_name} segmentation network on LMDB databases made by "
                                   "build_lmdb.py.")
    flags.add_flags(parser, TrainConfig, exclude,
                    no_xla=", ".join(n for n in models.MODEL_NAMES if models.xla_problem(n)) or "none",
                    divisors=", ".join(f"{models.SIZE_DIVISOR[n]} for {n}" for n in models.MODEL_NAMES))
    augment.add_augmentation_arguments(parser)
    return parser


class _Unset:
    """The value of a self-configurable flag the command line did not give."""

    def __repr__(self):
        return "<not given>"


UNSET = _Unset()


def parse_args(parser, argv=None):
    """Parse ``argv``; the flags of plan.AUTO_FLAGS that were not given hold UNSET, not their
    default (argparse fills a default only where the namespace has no value yet), so that
    config_from_args knows which ones the user chose."""
    return parser.parse_args(argv, namespace=argparse.Namespace(**{name: UNSET for name in plan.AUTO_FLAGS}))


def config_from_args(model_name, args, **values):
    """TrainConfig from parsed arguments (the augmentation flags resolved by augment.py); ``values``
    give the fields whose flags the parser left out."""
    try:
        augmentation = augment.augmentation_config_from_args(args)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from None
    unset = []
    for field in flags.flag_fields(TrainConfig):
        if field.name in values:
            continue
        value = getattr(args, field.name, UNSET)
        if value is UNSET:
            value = field.default
            unset.append(field.name)
        values[field.name] = flags.parsed_value(field, value)
    return TrainConfig(model=model_name, augmentation=augmentation, self_configure=unset, **values)


def read_database_metadata(path, role, flag_name=None):
    """Metadata of the --<role>_database (or of the flag ``flag_name``), or ConfigError naming the path."""
    try:
        return records.read_metadata(path)
    except (FileNotFoundError, records.RecordFormatError) as error:
        raise ConfigError(f"{flag_name or f'--{role}_database'} {path}: {error}") from None
    except lmdb.Error as error:  # a damaged file or a folder that is not an LMDB
        raise ConfigError(f"{flag_name or f'--{role}_database'} {path}: not a database built by "
                          f"build_lmdb.py ({type(error).__name__}: {error})") from None


def database_flag(config, role):
    """The flag that gave the --<role>_database of ``config``: pretrain_unet.py has one, --database."""
    return "--database" if config.pretext else f"--{role}_database"


def validate_config(config, train_metadata, test_metadata):
    """Raise ConfigError with a clear message for any value training cannot use."""

    if config.model not in models.MODEL_NAMES:
        raise ConfigError(f"model {config.model!r}: expected one of {', '.join(models.MODEL_NAMES)}")
    # A pretext head regresses the C input channels: one output is enough there.
    positive = {"batch_size": 1, "number_classes": 1 if config.pretext else 2, "early_stopping": 1, "reader_count": 1,
                "base_filters": 1, "log_every_n_steps": 1, "test_every_n_steps": 1, "max_epochs": 1,
                "cpu_towers": 1, "tile_size": 1}
    for name, minimum in positive.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} {value}: expected an integer >= {minimum}")
    if not 0 <= config.seed < 2 ** 32:  # Keras's and numpy's generators take no negative seed
        raise ConfigError(f"--seed {config.seed}: expected an integer from 0 to {2 ** 32 - 1}")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ConfigError(f"--output_dir {config.output_dir} is an existing file, not a folder; give the path "
                          "of a folder (it is created if missing)")
    if not (config.learning_rate >= 0 and math.isfinite(config.learning_rate)):
        raise ConfigError(f"--learning_rate {config.learning_rate}: expected a finite number >= 0")
    if config.mixed_precision not in (None,) + steps.MIXED_PRECISIONS:
        raise ConfigError(f"--mixed_precision {config.mixed_precision!r}: expected one of "
                          f"{', '.join(steps.MIXED_PRECISIONS)}")
    if config.loss not in steps.LOSSES:
        raise ConfigError(f"--loss {config.loss!r}: expected one of {', '.join(steps.LOSSES)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"--max_steps {config.max_steps}: expected an integer >= 1")
    if not 0.0 <= config.foreground_crop_fraction <= 1.0:
        raise ConfigError(f"--foreground_crop_fraction {config.foreground_crop_fraction}: expected a share "
                          "from 0 to 1")
    # The run length in steps is known only with the towers (train() checks it again then); all that
    # needs no run length, and a warm-up longer than --max_steps, is refused here already.
    _check_time_budget(config)
    _check_optimizer_settings(optimizer_settings(config, None, check=False),
                              config.max_steps or (math.inf if config.max_epochs or config.time_budget else None))
    options = models.shape_options(config)
    try:
        models.check_options(config.model, **options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        models.check_input_size(config.model, config.tile_size, config.tile_size, **options)
    except ValueError as error:
        raise ConfigError(f"--tile_size {config.tile_size}: {error}") from None
    for role, metadata, path in (("train", train_metadata, config.train_database),
                                 ("test", test_metadata, config.test_database)):
        name = database_flag(config, role)
        if not metadata.get("num_records"):
            raise ConfigError(f"{name} {path}: the database holds no records")
        if metadata.get("unlabelled_only") and not config.pretext:
            raise ConfigError(
                f"--{role}_database {path} is an unlabelled database (built with build_lmdb.py --unlabelled_only): "
                "it holds no masks to train on. Pretrain on it with pretrain_unet.py --database "
                f"{path}, then train on databases built with --mask_folder, with --init_from <the pretraining "
                "output folder>")
        found = [k for k, n in enumerate(metadata.get("class_pixel_counts", [])) if n > 0]
        if found and max(found) >= config.number_classes and not config.pretext:  # pretraining ignores masks
            hint = ""
            if 255 in found:
                hint = ("; label 255 usually means binary masks saved as 0/255 images: convert them to 0/1 "
                        "(e.g. mask // 255) and rebuild the database, rather than raising --number_classes")
            raise ConfigError(
                f"--number_classes {config.number_classes} is too small for {name} {path}: "
                f"it holds labels {found}; use --number_classes {max(found) + 1} or more{hint}")
        if role == "test" and not config.pretext and any("tile" in source for source in metadata.get("sources") or []):
            # The test pass predicts whole images as inference.py does; tiles would count pixels twice.
            raise ConfigError(f"{name} {path} holds tiles of its source images (a train database built with "
                              "--tile_size); the test pass needs whole images: give the test-<name>.lmdb that "
                              "build_lmdb.py wrote beside it")
        if role == "test" and not config.pretext:
            continue  # the test pass pads whole images of any size, as inference.py does; crops are training's
        smallest = min(min(shape[0], shape[1]) for shape in metadata["image_shapes"])
        divisor = models.size_divisor(config.model, **options)
        if smallest < divisor:
            # No tile fits: --time_budget's plan fell back to the smallest tile the network takes.
            raise ConfigError(
                f"{name} {path} holds images as small as {smallest} px; a {config.model} "
                + (f"of depth {config.unet_depth} " if config.model == "unet" else "")
                + f"takes tiles of at least {divisor} px (a multiple of {divisor}): pad the images to that "
                + ("size" if config.model != "unet" else "size, or use a smaller --unet_depth"))
        if smallest < config.tile_size:
            raise ConfigError(
                f"{name} {path} holds images as small as {smallest} px, smaller than "
                f"--tile_size {config.tile_size}; use a tile size <= {smallest}")
    if train_metadata["channels"] != test_metadata["channels"]:
        raise ConfigError(
            f"the training database has {train_metadata['channels']} channel(s), the test database "
            f"{test_metadata['channels']}: they must match")


def _check_time_budget(config):
    """ConfigError for an unreadable --time_budget or one given with another run length."""
    if config.time_budget is None:
        return
    try:
        plan.parse_duration(config.time_budget)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for name in ("max_steps", "max_epochs"):
        if getattr(config, name) is not None:
            raise ConfigError(f"--time_budget {config.time_budget} and --{name} {getattr(config, name)} both set "
                              f"the run length: give one of them")


def run_length(config, steps_per_epoch):
    """Steps the run lasts: --max_steps, --max_epochs x ``steps_per_epoch``, the smaller of the two when
    both are given, or None (only early stopping ends the run)."""
    lengths = [n for n in (config.max_steps,
                           config.max_epochs * steps_per_epoch if config.max_epochs and steps_per_epoch else None)
               if n]
    return min(lengths) if lengths else None


def optimizer_settings(config, steps_per_epoch, check=True):
    """optim.OptimizerSettings of a run, or ConfigError naming the flag (unless ``check`` is False).

    Args:
      steps_per_epoch: gradient steps between test passes (turns --max_epochs into steps).
    """
    total_steps = run_length(config, steps_per_epoch)
    warmup = config.warmup_steps
    if warmup is None:
        warmup = total_steps // 10 if total_steps and config.lr_schedule != "constant" else 0
    settings = optim.OptimizerSettings(
        optimizer=config.optimizer, learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
        warmup_steps=warmup, total_steps=total_steps,
        weight_decay=config.weight_decay, momentum=config.momentum, nesterov=bool(config.nesterov),
        mixed_precision=config.mixed_precision)
    if check:
        _check_optimizer_settings(settings, settings.total_steps)
    return settings


def _check_optimizer_settings(settings, total_steps):
    try:
        optim.check_settings(dataclasses.replace(settings, total_steps=total_steps))
    except ValueError as error:
        raise ConfigError(str(error)) from None
