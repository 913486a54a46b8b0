"""train_config.py: the parser generated from TrainConfig's fields, and the validation messages."""
import dataclasses

import numpy as np
import pytest

import augment
import flags
import records
import train_config
import trainer
from conftest import make_synthetic_db
from errors import ConfigError
from train_config import TrainConfig


def test_every_field_flag_is_declared_once_with_its_default():
    parser = train_config.build_parser("unet")
    actions = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        if "flag" not in field.metadata:
            continue
        action = actions[field.name]
        assert action.help and "{" not in action.help, field.name
        if not action.required:
            expected = int(field.default) if field.metadata["flag"]["kind"] == "binary" else field.default
            assert action.default == expected, field.name
    assert "divisible by 16 for unet, 32 for segnet" in actions["tile_size"].help
    # The augmentation flags come from AugmentationConfig's fields by the same code; their own default is
    # None (not given: --augmentation_config may set the value), the help shows the field's.
    for field in dataclasses.fields(augment.AugmentationConfig):
        action = actions[flags.flag_name(field)]
        assert action.default is None and action.help.endswith(f"(default {field.default:g})"), field.name
    assert "(not for segnet)" in actions["xla"].help
    # Defaults come from the dataclass: a config built from no flags equals TrainConfig's defaults.
    args = parser.parse_args(["--train_database", "a", "--test_database", "b", "--output_dir", "c"])
    config = train_config.config_from_args("unet", args)
    assert config == TrainConfig("unet", "a", "b", "c", augmentation=config.augmentation)
    assert "default 4)" in parser.format_help() and "(default 0.001)" in parser.format_help()


def test_parser_has_every_flag_with_help():
    parser = train_config.build_parser("unet")
    flags = {option for action in parser._actions for option in action.option_strings}
    for flag in ["--train_database", "--test_database", "--output_dir", "--batch_size", "--number_classes",
                 "--tile_size", "--learning_rate", "--test_every_n_steps", "--early_stopping",
                 "--gradient_update_location", "--restore_checkpoint_filepath", "--reader_count",
                 "--use_augmentation", "--balance_classes", "--seed", "--base_filters", "--max_epochs",
                 "--gpus", "--cpu_towers", "--mixed_precision", "--xla", "--loss",
                 "--augmentation_config", "--noise_augmentation_severity"]:
        assert flag in flags
    assert all(action.help for action in parser._actions)
    args = parser.parse_args(["--train_database", "a", "--test_database", "b", "--output_dir", "c",
                              "--noise_augmentation_severity", "0.3", "--use_augmentation", "0"])
    config = train_config.config_from_args("unet", args)
    assert config.augmentation.noise == 0.3 and config.use_augmentation is False
    assert (config.number_classes, config.tile_size, config.learning_rate, config.early_stopping) == (2, 256, 1e-3, 10)
    # The recipe's defaults (see the ablation in docs/recipe.md): CE + Dice, a third of the crops on foreground,
    # and a poly decay whenever the run has a length (constant when only early stopping ends it).
    assert (config.loss, config.foreground_crop_fraction, config.lr_schedule) == ("ce+dice", 0.33, "constant")
    assert TrainConfig("unet", "a", "b", "c", max_epochs=5).lr_schedule == "poly"
    assert train_config.optimizer_settings(TrainConfig("unet", "a", "b", "c", max_steps=400), 50).warmup_steps == 40
    assert train_config.optimizer_settings(TrainConfig("unet", "a", "b", "c", max_steps=400,
                                                       lr_schedule="constant"), 50).warmup_steps == 0


def test_validate_config_messages(tmp_path):
    make_synthetic_db(tmp_path / "four", num_records=3, shape=(32, 32), number_classes=4, seed=0)
    meta = records.read_metadata(str(tmp_path / "four"))
    config = TrainConfig("unet", str(tmp_path / "four"), str(tmp_path / "four"), str(tmp_path / "o"),
                                 tile_size=32)
    with pytest.raises(ConfigError, match=r"--number_classes 2 is too small.*labels \[0, 1, 2, 3\]"):
        train_config.validate_config(config, meta, meta)
    config.number_classes = 4
    train_config.validate_config(config, meta, meta)
    config.tile_size = 64
    with pytest.raises(ConfigError, match=r"as small as 32 px, smaller than --tile_size 64"):
        train_config.validate_config(config, meta, meta)
    config.tile_size = 24
    with pytest.raises(ConfigError, match=r"--tile_size 24.*16"):
        train_config.validate_config(config, meta, meta)
    config.tile_size, config.model = 32, "segnet"
    train_config.validate_config(config, meta, meta)
    # Images smaller than any tile the network takes (a --time_budget plan falls back to the divisor).
    small = dict(meta, image_shapes=[[20, 24, 1]])
    with pytest.raises(ConfigError, match=r"as small as 20 px; a segnet takes tiles of at least 32 px"):
        train_config.validate_config(config, small, meta)
    # Test images are not cropped: smaller than the tile, or than any tile, they are fine.
    train_config.validate_config(config, meta, small)
    # A tiled database as the test database is refused at start, not after the first epoch.
    tiled = dict(meta, sources=[{"image": "a.tif", "mask": "a.tif", "tile": [0, 0]}])
    with pytest.raises(ConfigError, match=r"--test_database .* holds tiles of its source images"):
        train_config.validate_config(config, meta, tiled)
    config.batch_size = 0
    with pytest.raises(ConfigError, match=r"--batch_size 0: expected an integer >= 1"):
        train_config.validate_config(config, meta, meta)
    with pytest.raises(ConfigError, match=r"--train_database .*missing.*not an LMDB database"):
        train_config.read_database_metadata(str(tmp_path / "missing"), "train")
    with pytest.raises(ConfigError, match="no checkpoint there"):
        trainer.find_restore_checkpoint(str(tmp_path))


def test_mixed_precision_flag_takes_float16_bare_or_a_named_dtype():
    parser = train_config.build_parser("unet")
    required = ["--train_database", "a", "--test_database", "b", "--output_dir", "c"]

    def parsed(*flags):
        return train_config.config_from_args("unet", parser.parse_args([*required, *flags])).mixed_precision

    assert parsed() is None
    assert parsed("--mixed_precision") == "float16"           # the flag's meaning before it took a value
    assert parsed("--mixed_precision", "bfloat16") == "bfloat16"
    assert parsed("--mixed_precision", "float16", "--xla") == "float16"
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--mixed_precision", "float8"])
    # Code that passed the old on/off value keeps working.
    assert TrainConfig("unet", "a", "b", "c", mixed_precision=True).mixed_precision == "float16"
    assert TrainConfig("unet", "a", "b", "c", mixed_precision=False).mixed_precision is None


def test_too_few_classes_for_0_255_masks_names_the_likely_cause(tmp_path):
    probabilities = np.zeros(256)
    probabilities[[0, 255]] = 0.5
    make_synthetic_db(tmp_path / "binary", num_records=2, shape=(32, 32), number_classes=256, seed=0,
                      class_probabilities=probabilities)
    meta = records.read_metadata(str(tmp_path / "binary"))
    config = TrainConfig("unet", str(tmp_path / "binary"), str(tmp_path / "binary"), str(tmp_path / "o"), tile_size=32)
    with pytest.raises(ConfigError, match=r"--number_classes 2 is too small.*labels \[0, 255\].*0/255.*0/1"):
        train_config.validate_config(config, meta, meta)


def test_recipe_flags_parse_into_the_config():
    parser = train_config.build_parser("unet")
    args = parser.parse_args(["--train_database", "a", "--test_database", "b", "--output_dir", "c",
                              "--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "0", "--weight_decay",
                              "3e-5", "--lr_schedule", "poly", "--warmup_steps", "20", "--max_steps", "400",
                              "--foreground_crop_fraction", "0.33", "--unet_depth", "3", "--upsampling",
                              "bilinear", "--encoder", "residual"])
    config = train_config.config_from_args("unet", args)
    assert (config.optimizer, config.momentum, config.nesterov, config.weight_decay) == ("sgd", 0.9, False, 3e-5)
    assert (config.lr_schedule, config.warmup_steps, config.max_steps) == ("poly", 20, 400)
    assert (config.foreground_crop_fraction, config.unet_depth, config.upsampling) == (0.33, 3, "bilinear")
    assert config.encoder == "residual"
    settings = train_config.optimizer_settings(config, steps_per_epoch=50)
    assert (settings.optimizer, settings.total_steps, settings.nesterov) == ("sgd", 400, False)
    # --max_epochs x steps per epoch is the run length; with both, the shorter one.
    assert train_config.run_length(dataclasses.replace(config, max_steps=None, max_epochs=3), 50) == 150
    assert train_config.run_length(dataclasses.replace(config, max_epochs=3), 100) == 300
    assert train_config.run_length(dataclasses.replace(config, max_steps=None), 100) is None
    for bad in (["--optimizer", "lamb"], ["--lr_schedule", "step"], ["--upsampling", "nearest"], ["--nesterov", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--train_database", "a", "--test_database", "b", "--output_dir", "c", *bad])


def test_recipe_flag_values_are_validated_by_name(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=3, shape=(40, 40), seed=0)
    meta = records.read_metadata(str(tmp_path / "db"))

    def check(**values):
        config = TrainConfig("unet", str(tmp_path / "db"), str(tmp_path / "db"), str(tmp_path / "o"),
                             tile_size=40, **{"unet_depth": 3, **values})
        train_config.validate_config(config, meta, meta)

    check()  # 40 px tiles suit a depth-3 UNet (divisor 8) ...
    with pytest.raises(ConfigError, match=r"--tile_size 40: unet needs .*divisible by 16"):
        check(unet_depth=4)  # ... but not the default depth 4
    with pytest.raises(ConfigError, match=r"--unet_depth 0: expected an integer from 1 to 6"):
        check(unet_depth=0)
    with pytest.raises(ConfigError, match=r"--lr_schedule cosine decays over the run.*--max_steps, or --max_epochs"):
        check(lr_schedule="cosine")
    check(lr_schedule="cosine", max_epochs=5)
    with pytest.raises(ConfigError, match=r"--warmup_steps 100 must be smaller than the run length \(100 steps\)"):
        check(lr_schedule="poly", warmup_steps=100, max_steps=100)
    with pytest.raises(ConfigError, match=r"--weight_decay needs --optimizer adamw or sgd"):
        check(weight_decay=1e-4)
    check(weight_decay=1e-4, optimizer="adamw")
    with pytest.raises(ConfigError, match=r"--momentum 1.0: expected a value in \[0, 1\)"):
        check(optimizer="sgd", momentum=1.0)
    with pytest.raises(ConfigError, match=r"--max_steps 0: expected an integer >= 1"):
        check(max_steps=0)
    with pytest.raises(ConfigError, match=r"--foreground_crop_fraction 1.5: expected a share from 0 to 1"):
        check(foreground_crop_fraction=1.5)
    config = TrainConfig("segnet", str(tmp_path / "db"), str(tmp_path / "db"), str(tmp_path / "o"), tile_size=32,
                         upsampling="bilinear")
    with pytest.raises(ConfigError, match=r"--upsampling bilinear applies to unet only, not to segnet"):
        train_config.validate_config(config, meta, meta)
