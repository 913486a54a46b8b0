"""Pretrain a UNet on images without masks (self-supervised), for train_unet.py --init_from.

    python build_lmdb.py --image_folder unlabelled/ --unlabelled_only --output_folder data \\
        --dataset_name cells --tile_size 256
    python pretrain_unet.py --database data/unlabelled-cells.lmdb --output_dir runs/pretrain --max_steps 2000
    python train_unet.py --train_database ... --test_database ... --output_dir runs/cells \\
        --init_from runs/pretrain

The run is the trainer's (trainer.py): the same architecture flags, towers, readers, checkpoints,
resume (--restore_checkpoint_filepath), SIGTERM/SIGINT handling and Slurm support as train_unet.py;
only the task differs (pretext.py: blind-spot denoising). The labels' flags (--number_classes, --loss,
--balance_classes, --foreground_crop_fraction) do not exist here; the test pass scores the pretext
loss on fixed crops of the same database (see pretext.BlindSpotEvaluator).
"""
import dataclasses
import sys

import errors
import pretext
import trainer
import train_config

# Flags of train_unet.py that need labels or a second database.
EXCLUDED_FLAGS = ("train_database", "test_database", "number_classes", "loss", "balance_classes",
                  "foreground_crop_fraction", "init_from")


def build_parser():
    parser = train_config.build_parser(
        "unet", exclude=EXCLUDED_FLAGS, prog="pretrain_unet.py",
        description="Pretrain a UNet with a self-supervised task on an LMDB database of images (build_lmdb.py "
                    "--unlabelled_only, or any train database: its masks are not used); fine-tune it with "
                    "train_unet.py --init_from OUTPUT_DIR.")
    parser.add_argument("--database", required=True,
                        help="LMDB folder of images to pretrain on (build_lmdb.py --unlabelled_only writes "
                             "unlabelled-<name>.lmdb); never the test images of the later evaluation")
    pretext.add_arguments(parser)
    return parser


def config_from_args(args):
    """The TrainConfig of a pretraining run: one database for training and the pretext test pass,
    and an output head of as many channels as the images have."""
    settings = pretext.config_from_args(args)
    problems = settings.problems()
    if problems:
        raise errors.ConfigError("; ".join(problems))
    metadata = train_config.read_database_metadata(args.database, None, "--database")
    config = train_config.config_from_args(
        "unet", args, train_database=args.database, test_database=args.database,
        number_classes=int(metadata["channels"] or 1), loss="ce", balance_classes=False,
        foreground_crop_fraction=0.0, init_from=None, pretext=dataclasses.asdict(settings))
    if settings.task == "blind_spot" and settings.radius >= config.tile_size:
        # A masked pixel's replacement is mirrored into the crop, which needs the crop to be wider.
        raise errors.ConfigError(f"--neighbour_radius {settings.radius}: must be smaller than --tile_size "
                                 f"{config.tile_size}")
    return config


def main(argv=None, owns_process=False):
    return trainer.run_command(build_parser(), config_from_args, argv, owns_process)


if __name__ == "__main__":
    sys.exit(main(owns_process=True))
