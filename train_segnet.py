"""Train a SegNet (see trainer.py for the loop and `python train_segnet.py --help` for the flags)."""
import sys

import trainer


def main(argv=None, owns_process=False):
    return trainer.main("segnet", argv, owns_process)


if __name__ == "__main__":
    sys.exit(main(owns_process=True))
