"""Train a UNet (see trainer.py for the loop and `python train_unet.py --help` for the flags)."""
import sys

import trainer


def main(argv=None):
    return trainer.main("unet", argv)


if __name__ == "__main__":
    sys.exit(main())
