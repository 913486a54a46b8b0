"""Run the tool end to end on the built-in synthetic dataset, so a new user sees every part work.

    python demo.py [--output_dir demo_output]

Each step is a small function taking the config and what earlier steps returned:
  1. generate_data: write the synthetic images and masks (skipped when they already exist).
  2. build_databases: turn them into train-demo.lmdb and test-demo.lmdb.
"""
import argparse
import dataclasses
import os
import sys

import build_lmdb
import demo_data


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "demo_output"
    num_images: int = 48
    image_size: int = 256
    seed: int = 0

    @property
    def data_dir(self):
        return os.path.join(self.output_dir, "data")


def generate_data(config):
    """Step 1: the synthetic dataset; returns (image_folder, mask_folder)."""
    image_folder = os.path.join(config.data_dir, "images")
    mask_folder = os.path.join(config.data_dir, "masks")
    if os.path.isdir(image_folder) and os.path.isdir(mask_folder) and os.listdir(image_folder):
        print(f"[1] demo data already present in {config.data_dir}")
        return image_folder, mask_folder
    image_folder, mask_folder = demo_data.generate_demo_dataset(
        config.data_dir, num_images=config.num_images, size=config.image_size, seed=config.seed)
    classes = ", ".join(f"{k} {name}" for k, name in demo_data.CLASS_NAMES.items())
    print(f"[1] wrote {config.num_images} synthetic {config.image_size}x{config.image_size} images to "
          f"{image_folder} and masks ({classes}) to {mask_folder}")
    return image_folder, mask_folder


def build_databases(config, folders):
    """Step 2: train-demo.lmdb and test-demo.lmdb; returns the build_lmdb.BuildResult."""
    image_folder, mask_folder = folders
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=image_folder, mask_folder=mask_folder, output_folder=config.output_dir,
        dataset_name="demo", train_fraction=0.8, seed=config.seed))
    print("[2] " + build_lmdb.format_summary(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the tool end to end on a synthetic dataset.")
    parser.add_argument("--output_dir", default="demo_output",
                        help="folder for the demo data and everything built from it (default demo_output)")
    config = DemoConfig(output_dir=parser.parse_args(argv).output_dir)
    try:
        folders = generate_data(config)
        databases = build_databases(config, folders)
    except build_lmdb.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nDone. Data: {config.data_dir}  Train database: {databases.paths['train']}  "
          f"Test database: {databases.paths['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
