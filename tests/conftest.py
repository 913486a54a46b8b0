"""Shared test fixtures: the real NIST colony data (when present) and small synthetic databases."""
import os
import pathlib
import signal
import socket

import numpy as np
import pytest

# Quiet TensorFlow's C++ start-up banner in test output; set before any test imports tensorflow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# bioimageio.core (imported by the export tests) sets KERAS_BACKEND to its own default, "torch", in
# os.environ when it is imported; every later subprocess of the session (train_unet.py, ...) would
# inherit it and fail to start Keras. Pin this project's backend for the whole session.
os.environ["KERAS_BACKEND"] = "tensorflow"
# A suite started in the background of a shell without job control (`cmd &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored in every process the tests start: the Ctrl-C tests
# (SIGINT to build_lmdb.py, the readers, the trainer) would then see nothing. A handled signal is
# reset to the default in a started program, so handling it here gives them a normal SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = pathlib.Path(__file__).resolve().parent.parent
NIST_DIR = ROOT.parent / "shared" / "data" / "nist_colonies"


@pytest.fixture
def nist_dir():
    """The real nist_colonies data (images/ and masks/), or a skip when it is not on this machine."""
    if not (NIST_DIR / "images").is_dir() or not (NIST_DIR / "masks").is_dir():
        pytest.skip(f"real data not present at {NIST_DIR} (it ships only with the development machines)")
    return NIST_DIR


def make_synthetic_db(path, num_records=10, shape=(32, 32), channels=1, dtype=np.uint16,
                      number_classes=2, seed=0, class_probabilities=None):
    """Write a small real LMDB of random images whose masks are simple class blocks.

    Each image pixel equals 1000 * its mask label plus noise, so tests can check alignment.
    Returns the metadata dict written.
    """
    import records

    rng = np.random.default_rng(seed)
    h, w = shape

    def pairs():
        for i in range(num_records):
            p = class_probabilities if class_probabilities is not None else None
            labels = rng.choice(number_classes, size=(h // 8, w // 8), p=p)
            mask = np.kron(labels, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
            image = 1000.0 * mask[..., None] + rng.normal(0, 50, size=(h, w, channels)) + 500
            image = np.clip(image, 0, np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None)
            yield image.astype(dtype), mask, {"image": f"img_{i:03d}.tif", "mask": f"img_{i:03d}.tif"}

    return records.write_database(str(path), pairs(),
                                  {"split": "train", "split_seed": 0, "train_fraction": 1.0})


def whole_image_logits(model, image, divisor=16):
    """Oracle: normalise the whole image, reflect-pad it to the divisor, one model call, crop."""
    import normalization
    import predictor

    image = image.reshape(image.shape[:2] + (-1,))
    normalized = normalization.normalize(image, normalization.channel_statistics(image))
    padded, (top, left) = predictor.pad_to_divisor(normalized, divisor)
    logits = np.asarray(model(padded[np.newaxis], training=False))[0]
    return logits[top:top + image.shape[0], left:left + image.shape[1]]


def free_ports(count):
    """Distinct free TCP ports on the loopback interface."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
