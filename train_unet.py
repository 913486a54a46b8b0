"""Train a UNet (see trainer.py for the loop and `python train_unet.py --help` for the flags)."""
import sys

import trainer


def main(argv=None, owns_process=False):
    return trainer.main("unet", argv, owns_process)


if __name__ == "__main__":
    sys.exit(main(owns_process=True))
