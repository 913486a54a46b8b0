"""Per-image prediction uncertainty, to spend a user's correction time where it helps most.

inference.py --uncertainty_csv PATH ranks the images it segments, most uncertain first: correct
those masks (or paint only their wrong regions, see docs/sparse-labels.md) and retrain. Per pixel
the uncertainty is the entropy of the softmax in units of log(K) (0 = one class has probability
1, 1 = all K classes equally likely), so the figures mean the same for any class count; the
ensemble or TTA softmax is used when inference.py averages one.

    mean_entropy      the image's mean normalised entropy
    uncertain_share   the share of its pixels whose normalised entropy exceeds UNCERTAIN_ENTROPY
"""
import csv
import fcntl
import io
import math
import os

import numpy as np

import image_io

# 0.5 is a winning class of p ~ 0.89 for 2 classes: a pixel the model would often get wrong.
UNCERTAIN_ENTROPY = 0.5
COLUMNS = ["rank", "image", "mean_entropy", "uncertain_share", "pixels"]


def normalized_entropy(logits):
    """Softmax entropy / log(K) of float logits [..., K]: float32 [...] in [0, 1]."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    entropy = -np.sum(probabilities * np.log(np.maximum(probabilities, np.finfo(np.float64).tiny)), axis=-1)
    return (entropy / math.log(logits.shape[-1])).astype(np.float32)


class ImageUncertainty:
    """Sums over one image's pixels, fed band by band (images need not fit in memory)."""

    def __init__(self):
        self.entropy_sum, self.uncertain, self.pixels = 0.0, 0, 0

    def add(self, entropy):
        """Add the normalised entropies of some of the image's pixels (any shape)."""
        entropy = np.asarray(entropy)
        self.entropy_sum += float(entropy.sum(dtype=np.float64))
        self.uncertain += int(np.count_nonzero(entropy > UNCERTAIN_ENTROPY))
        self.pixels += entropy.size

    def sums(self):
        """The sums as a JSON-ready dict (a band's, kept in its marker by sharding.write_band_marker)."""
        return {"entropy_sum": self.entropy_sum, "uncertain": self.uncertain, "pixels": self.pixels}

    @classmethod
    def combined(cls, sums):
        """The tally of a whole image from its bands' ``sums()`` dicts."""
        tally = cls()
        for part in sums:
            tally.entropy_sum += float(part["entropy_sum"])
            tally.uncertain += int(part["uncertain"])
            tally.pixels += int(part["pixels"])
        return tally

    def row(self, image):
        return {"image": image, "mean_entropy": self.entropy_sum / max(self.pixels, 1),
                "uncertain_share": self.uncertain / max(self.pixels, 1), "pixels": self.pixels}


class RankingError(ValueError):
    """An --uncertainty_csv that is not a ranking (it is left as it is) or cannot be written."""


def _lock(path):
    """The lock file beside the ranking ``path``, opened for appending (created if missing)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    lock = os.path.join(folder, f".{name}.lock")
    try:
        return open(lock, "a")
    except OSError as exc:
        raise RankingError(f"--uncertainty_csv {path}: cannot write beside it ({lock}: {exc.strerror}); "
                           "choose a folder you can write to") from exc


def check_writable(path):
    """Raise RankingError now when the ranking at ``path`` could not be written at the end of a run."""
    _lock(path).close()


def write_ranking(path, rows, keep=()):
    """Write ``rows`` (ImageUncertainty.row dicts) to the CSV ``path`` atomically, most uncertain
    first (by mean_entropy, then uncertain_share, then name), with a 1-based rank column.

    Rows already in ``path`` for images named in ``keep`` and not in ``rows`` are kept: the parts
    of a sharded run (inference.py --part I/N, one process each, at the same time or one after the
    other) and a rerun with --skip_existing each add their images to one ranking, while rows of
    images no longer in the folder go. A lock file beside ``path`` (".NAME.lock") serialises the
    read-merge-write of concurrent parts. Returns the ranked rows written.

    Raises:
      RankingError when ``path`` exists but is not such a ranking (it is not overwritten).
    """
    with _lock(path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = set(keep) - {row["image"] for row in rows}
        merged = list(rows) + [row for row in read_ranking(path) if row["image"] in kept]
        ranked = sorted(merged, key=lambda r: (-r["mean_entropy"], -r["uncertain_share"], r["image"]))
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for rank, row in enumerate(ranked, start=1):
            writer.writerow({"rank": rank, "image": row["image"], "mean_entropy": f"{row['mean_entropy']:.6f}",
                             "uncertain_share": f"{row['uncertain_share']:.6f}", "pixels": row["pixels"]})
        try:
            image_io.atomic_write(path, lambda f: f.write(text.getvalue()), mode="w")
        except OSError as exc:
            raise RankingError(f"--uncertainty_csv {path}: cannot write it ({exc})") from exc
    return ranked


def read_ranking(path):
    """The rows of an existing ranking CSV (none when ``path`` does not exist or is empty)."""
    problem = f"--uncertainty_csv {path}: exists and is not a ranking written by inference.py"
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RankingError(f"{problem} ({exc}); it was left as it is: choose another path") from exc
    if not text:
        return []
    if text.splitlines()[0] != ",".join(COLUMNS):
        raise RankingError(f"{problem} (its first line is not {','.join(COLUMNS)}); it was left as it is: "
                           "choose another path")
    try:
        return [{"image": r["image"], "mean_entropy": float(r["mean_entropy"]),
                 "uncertain_share": float(r["uncertain_share"]), "pixels": int(r["pixels"])}
                for r in csv.DictReader(io.StringIO(text))]
    except (TypeError, ValueError, csv.Error) as exc:
        raise RankingError(f"{problem} (a row does not parse: {exc}); it was left as it is: "
                           "choose another path") from exc
