"""ImageReader: real LMDBs in tmp_path, real worker processes."""
import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import build_lmdb
import normalization
import records
from conftest import make_synthetic_db
from imagereader import SHM_PREFIX, ImageReader, ImageReaderError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gone(pid):
    """True when the process no longer exists (a zombie waiting for an absent reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _segments(pid=None):
    prefix = SHM_PREFIX if pid is None else f"{SHM_PREFIX}{pid}_"
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def _assert_nothing_left(pids):
    assert pids and all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
    assert _segments(os.getpid()) == []


def test_train_batches_shapes_dtypes_and_normalisation(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=6, shape=(64, 64), channels=2)
    with ImageReader(str(tmp_path / "db"), batch_size=4, tile_size=32, num_workers=2) as reader:
        for _ in range(3):
            images, masks = reader.get_batch(timeout=30)
            assert images.shape == (4, 32, 32, 2) and images.dtype == np.float32
            assert masks.shape == (4, 32, 32) and masks.dtype == np.int32
            assert set(np.unique(masks)) <= {0, 1}
            assert np.isfinite(images).all() and np.abs(images).max() < 10
    # Whole records, no augmentation: each record is its own source image, so each image is
    # exactly z-scored per channel.
    with ImageReader(str(tmp_path / "db"), batch_size=4, use_augmentation=False, num_workers=1) as reader:
        images, _ = reader.get_batch(timeout=30)
    np.testing.assert_allclose(images.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(1, 2)), 1, atol=1e-4)


def test_train_crops_stay_aligned_with_masks(tmp_path):
    # Synthetic images are 1000 * label + noise: after normalisation, class-1 pixels stay brighter.
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(64, 64))
    with ImageReader(str(tmp_path / "db"), 8, use_augmentation=False, tile_size=32) as reader:
        images, masks = reader.get_batch(timeout=30)
    for image, mask in zip(images[..., 0], masks):
        if 0 < mask.mean() < 1:
            assert image[mask == 1].min() > image[mask == 0].max()


def _first_batches(db, seed, count=4):
    with ImageReader(db, 4, num_workers=2, tile_size=24, seed=seed) as reader:
        return [reader.get_batch(timeout=30) for _ in range(count)]


def test_same_seed_same_batches(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=8, shape=(32, 32))
    db = str(tmp_path / "db")
    first, again, other = _first_batches(db, 3), _first_batches(db, 3), _first_batches(db, 4)
    for (a_img, a_mask), (b_img, b_mask) in zip(first, again):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_balance_classes_moves_toward_uniform(tmp_path):
    # 20 records, only 2 of them hold class 1.
    def pairs():
        for i in range(20):
            mask = np.zeros((16, 16), np.uint8)
            if i < 2:
                mask[4:12, 4:12] = 1
            yield np.full((16, 16, 1), 100 + i, np.uint16), mask, {"image": f"{i}", "mask": f"{i}"}

    records.write_database(str(tmp_path / "db"), pairs(), {"split": "train", "split_seed": 0, "train_fraction": 1.0})

    def fraction_with_class_1(balance):
        with ImageReader(str(tmp_path / "db"), 8, use_augmentation=False, balance_classes=balance,
                         num_workers=2) as reader:
            masks = np.concatenate([reader.get_batch(timeout=30)[1] for _ in range(30)])
        return (masks == 1).any(axis=(1, 2)).mean()

    plain, balanced = fraction_with_class_1(False), fraction_with_class_1(True)
    assert plain == pytest.approx(0.1, abs=0.05)  # 2 of 20 records, each epoch a permutation
    assert balanced == pytest.approx(0.55, abs=0.12)  # half the draws pick class 1, then 2/20 of the rest


def test_worker_exception_surfaces_with_traceback(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(16, 16))
    import lmdb

    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        txn.put(records.record_key(2), b"not a record")
    env.close()
    reader = ImageReader(str(tmp_path / "db"), 4, num_workers=2)
    reader.startup()
    pids = reader.worker_pids
    with pytest.raises(ImageReaderError, match="RecordFormatError") as info:
        for _ in range(3):
            reader.get_batch(timeout=30)
    assert "_read_item" in info.value.worker_traceback
    assert "db: record 2: record does not start with" in str(info.value).splitlines()[0]
    _assert_nothing_left(pids)  # the reader shut itself down before raising
    reader.shutdown()


def test_killed_worker_is_detected(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(16, 16))
    with ImageReader(str(tmp_path / "db"), 2, num_workers=2) as reader:
        reader.get_batch(timeout=30)
        pids = reader.worker_pids
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ImageReaderError, match="SIGKILL"):
            while time.monotonic() - start < 30:
                reader.get_batch(timeout=30)
        assert time.monotonic() - start < 5
    _assert_nothing_left(pids)


def test_shutdown_with_full_queue_is_quick_and_clean(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(16, 16))
    reader = ImageReader(str(tmp_path / "db"), 2, num_workers=2, queue_size=4)
    reader.startup()
    reader.get_batch(timeout=30)
    deadline = time.monotonic() + 30
    while reader.get_queue_size() < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.get_queue_size() == 4  # every worker is now blocked waiting for a free slot
    pids = reader.worker_pids
    assert len(_segments(os.getpid())) == 1
    start = time.monotonic()
    reader.shutdown()
    assert time.monotonic() - start < 3
    _assert_nothing_left(pids)
    reader.shutdown()  # idempotent


def test_exception_in_with_block_leaves_nothing(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(16, 16))
    with pytest.raises(KeyError):
        with ImageReader(str(tmp_path / "db"), 2, num_workers=2) as reader:
            pids = reader.worker_pids
            reader.get_batch(timeout=30)
            raise KeyError("boom")
    _assert_nothing_left(pids)


@contextlib.contextmanager
def _reader_parent(tmp_path, loop, setup=""):
    """A parent process, in a session of its own, that runs ``setup``, starts a 2-worker ImageReader
    on a small database, prints {"pid", "workers"} as JSON and then runs ``loop``. Yields (process,
    info); afterwards kills whatever of it is left."""
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(32, 32))
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from imagereader import ImageReader
    """) + textwrap.dedent(setup) + textwrap.dedent(f"""
        reader = ImageReader({str(tmp_path / "db")!r}, 2, num_workers=2)
        reader.startup()
        reader.get_batch(timeout=30)
        print(json.dumps({{"pid": os.getpid(), "workers": reader.worker_pids}}), flush=True)
    """) + textwrap.dedent(loop))
    # stderr to a file: orphaned workers that failed to exit would hold a pipe open forever.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  start_new_session=True)
    info = {"workers": []}
    try:
        line = parent.stdout.readline()
        while line.startswith("Input Queue Starvation"):
            line = parent.stdout.readline()
        info = json.loads(line)
        yield parent, info
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in info["workers"]:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_parent_leaves_no_workers_or_shared_memory(tmp_path, signum):
    # SIGTERM kills the parent without running atexit: the orphaned workers must notice and the
    # resource tracker frees the segment. SIGINT goes to the whole process group, as Ctrl-C in a
    # terminal does: the parent's KeyboardInterrupt runs the atexit shutdown, the workers ignore it.
    with _reader_parent(tmp_path, loop="""
        while True:
            reader.get_batch(timeout=30)
    """) as (parent, info):
        assert len(_segments(info["pid"])) == 1
        if signum == signal.SIGINT:
            os.killpg(parent.pid, signum)
        else:
            parent.send_signal(signum)
        assert parent.wait(timeout=10) == -signum
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (all(map(_gone, info["workers"])) and not _segments(info["pid"])):
            time.sleep(0.1)
        assert all(map(_gone, info["workers"]))
        assert _segments(info["pid"]) == []


def test_workers_do_not_rerun_the_main_script(tmp_path):
    # A spawned child normally re-imports the parent's __main__ script: for train_unet.py that
    # would mean importing TensorFlow in every worker.
    make_synthetic_db(tmp_path / "db", num_records=2, shape=(16, 16))
    marker = tmp_path / "imported_by.txt"
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        with open({str(marker)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        from imagereader import ImageReader

        if __name__ == "__main__":
            with ImageReader({str(tmp_path / "db")!r}, 2, num_workers=2) as reader:
                reader.get_batch(timeout=30)
                print(os.getpid(), *reader.worker_pids)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    parent_pid = result.stdout.split()[-3]
    assert marker.read_text().split() == [parent_pid]


def test_starvation_messages(tmp_path, capsys):
    make_synthetic_db(tmp_path / "db", num_records=4, shape=(16, 16))
    with ImageReader(str(tmp_path / "db"), 2, num_workers=1, queue_size=4) as reader:
        reader.get_batch(timeout=30)  # empty queue at the first call: starving
        reader.get_batch(timeout=30)
        deadline = time.monotonic() + 30
        while reader.get_queue_size() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        reader.get_batch(timeout=30)  # full again: over
        assert reader.starvation_seconds > 0
    lines = capsys.readouterr().out.splitlines()
    assert collections.Counter(lines) == {"Input Queue Starvation !!!!": 1, "Input Queue Starvation Over": 1}
    assert lines.index("Input Queue Starvation !!!!") < lines.index("Input Queue Starvation Over")


def test_bad_arguments_are_reported(tmp_path):
    make_synthetic_db(tmp_path / "db", num_records=2, shape=(16, 16))
    with pytest.raises(ValueError, match=r"db: record 0 is 16x16, smaller than tile_size 32"):
        ImageReader(str(tmp_path / "db"), 2, tile_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        ImageReader(str(tmp_path / "db"), 0)
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageReader(str(tmp_path / "missing"), 2)
    with pytest.raises(RuntimeError, match="startup"):
        ImageReader(str(tmp_path / "db"), 2).get_batch()


def test_crops_are_normalised_with_the_whole_source_image_statistics(tmp_path):
    # Two 100 x 136 source images with a bright strip; the mask encodes each pixel's position, so
    # every delivered pixel can be traced back to its source pixel. The train image is stored as
    # overlapping 80 px tiles, the test image whole; the reader takes 64 px crops / tiles.
    import tifffile

    rng = np.random.default_rng(0)
    position = np.arange(100 * 136, dtype=np.uint16).reshape(100, 136)
    expected = {}
    for folder in ("images", "masks"):
        os.makedirs(tmp_path / folder)
    for stem in ("a", "b"):
        image = rng.normal(1000, 40, (100, 136)).clip(0).astype(np.uint16)
        image[:, 60:70] += 5000
        tifffile.imwrite(tmp_path / "images" / f"{stem}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"{stem}.tif", position)
        expected[stem] = normalization.normalize(image, normalization.channel_statistics(image))
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
        output_folder=str(tmp_path / "out"), dataset_name="strip", train_fraction=0.5,
        tile_size=80, tile_overlap=16), show_progress=False)

    def check(images, masks, stem):
        valid = masks >= 0
        y, x = np.divmod(masks[valid], 136)
        np.testing.assert_allclose(images[..., 0][valid], expected[stem][y, x], atol=1e-5)

    train_stem = os.path.splitext(os.path.basename(result.metadata["train"]["sources"][0]["image"]))[0]
    offsets = set()
    with ImageReader(result.paths["train"], 8, use_augmentation=False, tile_size=64, seed=1) as reader:
        for _ in range(3):
            images, masks = reader.get_batch(timeout=30)
            check(images, masks, train_stem)
            offsets.update(divmod(int(m[0, 0]), 136) for m in masks)
            # The old per-crop z-score would have made every crop zero-mean: these are not.
            assert np.abs(images.mean(axis=(1, 2, 3))).max() > 0.1
    assert len(offsets) >= 5
    test_stem = ({"a", "b"} - {train_stem}).pop()
    with ImageReader(result.paths["test"], 4, use_augmentation=False, tile_size=64) as reader:
        images, masks = reader.get_batch(timeout=30)
    check(images, masks, test_stem)


def test_augmented_crops_of_int32_images_with_a_large_offset_keep_their_spread(tmp_path):
    # 1e8 +- 10: float32 holds integers exactly only up to 2**24, so an augmented crop cast to float32
    # kept a handful of values (a constant after normalisation), while inference normalises the
    # int32 values exactly. Flips only: every delivered pixel is a source pixel, traced by the mask.
    import augment

    rng = np.random.default_rng(0)
    image = (100_000_000 + rng.integers(-10, 11, (64, 64))).astype(np.int32)
    position = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    records.write_database(str(tmp_path / "db"), iter([(image, position, {"image": "a.tif", "mask": "a.tif"})]),
                           {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    expected = normalization.normalize(image, normalization.channel_statistics(image))
    assert expected.std() > 0.9
    flips = dataclasses.replace(augment.AugmentationConfig.disabled(), reflection=True)
    with ImageReader(str(tmp_path / "db"), 4, augmentation=flips, tile_size=32, seed=2) as reader:
        images, masks = reader.get_batch(timeout=30)
    y, x = np.divmod(masks.astype(np.int64), 64)
    np.testing.assert_allclose(images[..., 0], expected[y, x], atol=1e-5)


def test_too_little_shared_memory_is_refused_naming_dev_shm_before_any_worker(tmp_path, monkeypatch):
    # A 4 MB /dev/shm (Docker gives 64 MB) killed the workers with SIGBUS at their first write past it.
    import collections
    import shutil

    import imagereader

    make_synthetic_db(tmp_path / "db", num_records=2, shape=(64, 64))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(4 * 2 ** 20, 4 * 2 ** 20 - 2 ** 19, 2 ** 19))
    reader = ImageReader(str(tmp_path / "db"), 8, tile_size=64, num_workers=2)
    with pytest.raises(ImageReaderError, match=r"/dev/shm has 0.5 MiB free; the readers' shared batch buffer "
                                               r"needs 2.0 MiB \(8 batches of 8 x 64 x 64 px x 1 channel"):
        reader.startup()
    assert imagereader.SHM_DIR == "/dev/shm" and not _segments(os.getpid())
    assert not reader._processes or all(p.pid is None for p in reader._processes)


def test_record_with_non_finite_values_stops_the_reader_naming_database_and_record(tmp_path):
    def pairs():
        for i in range(3):
            image = np.random.default_rng(i).normal(size=(16, 16, 1)).astype(np.float32)
            if i == 1:
                image[2, 3] = np.nan
            yield image, np.zeros((16, 16), np.uint8), {"image": f"{i}.tif", "mask": f"{i}.tif"}

    records.write_database(str(tmp_path / "db"), pairs(), {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    with pytest.raises(ImageReaderError) as info:
        with ImageReader(str(tmp_path / "db"), 3, use_augmentation=False) as reader:
            reader.get_batch(timeout=30)  # holds every record: each batch is drawn from a permutation
    first_line = str(info.value).splitlines()[0]
    assert f"{tmp_path / 'db'}: record 1 holds non-finite values" in first_line
    assert "NonFiniteRecordError" in first_line and "build_lmdb.py" in first_line


def test_older_database_format_is_refused_with_the_rebuild_message(tmp_path):
    from test_records import write_format_1_database

    path = write_format_1_database(tmp_path / "old.lmdb")
    with pytest.raises(records.RecordFormatError, match=r"old\.lmdb was built by an older build_lmdb\.py "
                                                        r"\(format 1\); rebuild it with build_lmdb\.py"):
        ImageReader(path, 2)


def test_sigterm_to_the_process_group_leaves_shutdown_to_the_parent(tmp_path):
    # Slurm signals every process of the job step. The workers must keep serving so the parent
    # (which handles SIGTERM itself) can finish and shut them down: no leftover process or segment.
    with _reader_parent(tmp_path, setup="""
        stopping = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    """, loop="""
        while not stopping:
            reader.get_batch(timeout=30)
        after = [reader.get_batch(timeout=30) for _ in range(5)]  # e.g. the last steps before a checkpoint
        reader.shutdown()
        print("after", len(after), flush=True)
    """) as (parent, info):
        os.killpg(parent.pid, signal.SIGTERM)
        out, _ = parent.communicate(timeout=30)
        assert parent.returncode == 0, (tmp_path / "stderr.txt").read_text()
        assert "after 5" in out
        assert all(map(_gone, info["workers"]))
        assert _segments(info["pid"]) == []


def _foreground_db(path):
    """Records of 128 x 128: 0 holds a rare class 2 (9 px, 0.05 %), 1 holds class 1 (a 20 x 20
    block), 2 holds class 1 and a rare class 3 (9 px)."""
    def pairs():
        for i in range(3):
            mask = np.zeros((128, 128), np.uint8)
            if i == 0:
                mask[100:103, 7:10] = 2
            else:
                mask[10:30, 90:110] = 1
            if i == 2:
                mask[120:123, 3:6] = 3
            image = np.random.default_rng(i).normal(100, 10, (128, 128, 1)).astype(np.float32)
            yield image, mask, {"image": f"{i}.tif", "mask": f"{i}.tif"}

    records.write_database(str(path), pairs(), {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    return str(path)


def test_foreground_crops_contain_their_class_even_when_rare(tmp_path):
    db = _foreground_db(tmp_path / "db")

    def crops(**kwargs):
        with ImageReader(db, 8, use_augmentation=False, tile_size=32, num_workers=1, seed=3, **kwargs) as reader:
            return np.concatenate([reader.get_batch(timeout=30)[1] for _ in range(30)])

    def share_holding(masks, label):
        return (masks == label).any(axis=(1, 2)).mean()

    placed = crops(foreground_crop_fraction=1.0)
    # Every crop holds foreground; records 0 and 1 hold one foreground class each, so their crops
    # hold exactly the drawn class. Records come in per-epoch permutations: a third are record 0.
    assert (placed > 0).any(axis=(1, 2)).all()
    assert share_holding(placed, 2) == pytest.approx(1 / 3, abs=0.02)
    # Record 2 draws class 1 or 3 uniformly: about half its crops hold the rare class 3.
    assert share_holding(placed, 3) == pytest.approx(1 / 6, abs=0.07)
    plain = crops()
    assert share_holding(plain, 2) < 0.15 and not (plain > 0).any(axis=(1, 2)).all()
    # With balance_classes, a record drawn for a foreground class is cropped on that class:
    # class 3 is drawn a quarter of the time, and record 2 adds its uniform half of the class-0 draws.
    balanced = crops(foreground_crop_fraction=1.0, balance_classes=True)
    assert (balanced > 0).any(axis=(1, 2)).all()
    assert share_holding(balanced, 3) == pytest.approx(1 / 4 + 1 / 12 * 1 / 2, abs=0.08)
    with pytest.raises(ValueError, match="foreground_crop_fraction"):
        ImageReader(db, 2, foreground_crop_fraction=1.5)
