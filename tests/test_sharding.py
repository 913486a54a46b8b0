"""sharding.py and inference.py --part / --skip_existing: parts of a folder balanced by pixels, row
bands of one image in a shared Zarr, and reruns that skip complete outputs and redo truncated ones."""
import csv
import json
import os
import pathlib

import imageio.v3 as iio
import keras
import numpy as np
import pytest
import tifffile
import zarr

import image_io
import inference
import models
import sharding
import writers

CLASSES = 3


def save_tiny_unet(folder, seed=0):
    """A random-weight 2-level UNet (2 base filters) saved like a training output folder."""
    keras.utils.set_random_seed(seed)
    model = models.build_model("unet", CLASSES, input_channels=1, base_filters=2, unet_depth=2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({
        "model": "unet", "number_classes": CLASSES, "tile_size": 64, "input_channels": 1,
        "base_filters": 2, "batch_norm": True, "unet_depth": 2}))
    return folder


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    return save_tiny_unet(tmp_path_factory.mktemp("tiny_unet"))


def random_image(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4000, size=shape) + 3000 * (rng.random(shape) > 0.7)).astype(np.uint16)


def run(image_folder, output_folder, model, **overrides):
    config = inference.InferenceConfig(image_folder=str(image_folder), output_folder=str(output_folder),
                                       model=str(model), tile_size=72, **overrides)
    return inference.run_inference(config)


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 8 ", (2, 8))])
def test_parse_part_reads_index_and_count(text, expected):
    assert sharding.parse_part(text) == expected


@pytest.mark.parametrize("text, message", [
    ("4/4", "--part 4/4: I must be in 0..N-1"), ("1/0", "--part 1/0: I must be in 0..N-1"),
    ("half", "--part 'half': expected I/N"), ("-1/2", "--part '-1/2': expected I/N")])
def test_parse_part_names_the_bad_value(text, message):
    with pytest.raises(sharding.PartError, match="^" + message.replace(".", r"\.")):
        sharding.parse_part(text)


def test_parts_hold_every_image_once_and_balance_pixels():
    rng = np.random.default_rng(0)
    sizes = {f"field_{i:04d}.tif": int(rng.integers(1, 50)) * 10_000 for i in range(500)}
    for count in (1, 2, 3, 7):
        parts = sharding.assign_parts(sizes, count)
        names = [name for part in parts for name in part]
        assert sorted(names) == sorted(sizes) and len(names) == len(set(names))
        loads = [sum(sizes[n] for n in part) for part in parts]
        # Greedy largest-first: no part exceeds the mean by more than the largest image.
        assert max(loads) - sum(loads) / count <= max(sizes.values())
        assert max(loads) - min(loads) <= max(sizes.values())
        assert sharding.assign_parts(dict(reversed(sizes.items())), count) == parts  # deterministic


def test_a_giant_slide_gets_a_part_of_its_own_and_ties_go_by_name():
    sizes = {"slide.tif": 1_000_000, **{f"small_{i}.tif": 1_000 for i in range(100)}}
    parts = sharding.assign_parts(sizes, 2)
    assert parts[0] == ["slide.tif"] and len(parts[1]) == 100
    # Equal sizes: by name, alternating parts.
    assert sharding.assign_parts({"b": 5, "a": 5, "c": 5, "d": 5}, 2) == [["a", "c"], ["b", "d"]]


def test_sizes_come_from_headers_and_an_unreadable_file_still_gets_a_part(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 30), np.uint16))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 20, 10), np.uint8))
    iio.imwrite(tmp_path / "b.png", np.zeros((16, 24, 3), np.uint8))
    zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(64, 32), chunks=(32, 32), dtype=np.uint8)
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    pixels = {p.name: sharding.pixel_count(sharding.header_shape(p)) for p in sorted(tmp_path.iterdir())}
    assert pixels == {"a.tif": 1200, "rgb.tif": 200, "b.png": 384, "c.zarr": 2048, "broken.tif": 0}
    paths = sorted(tmp_path.iterdir())
    shares = [sharding.select_part(paths, i, 2)[0] for i in range(2)]
    assert sorted(shares[0] + shares[1]) == paths and not set(shares[0]) & set(shares[1])
    assert sharding.select_part(paths, 0, 2)[2] == 1200 + 200 + 384 + 2048


def test_bands_cover_the_image_on_chunk_borders():
    for height, count in [(1100, 3), (512, 2), (5000, 7), (100, 4)]:
        bands = [sharding.band_rows(height, i, count, 512) for i in range(count)]
        assert bands[0][0] == 0 and bands[-1][1] == height
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
        assert all(lo % 512 == 0 for lo, _ in bands)
    assert [sharding.band_rows(100, i, 4, 512) for i in range(4)] == [(0, 0), (0, 0), (0, 0), (0, 100)]


def test_a_truncated_or_foreign_output_is_not_complete(tmp_path):
    mask = np.arange(200 * 100, dtype=np.uint16).reshape(200, 100)
    tifffile.imwrite(tmp_path / "m.tif", mask)
    np.save(tmp_path / "p.npy", np.ones((20, 10, 3), np.float32))
    assert sharding.output_is_complete(tmp_path / "m.tif", (200, 100))
    assert sharding.output_is_complete(tmp_path / "p.npy", (20, 10, 3))
    assert not sharding.output_is_complete(tmp_path / "m.tif", (100, 200))
    assert not sharding.output_is_complete(tmp_path / "missing.tif", (200, 100))
    for name in ("m.tif", "p.npy"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) - 100])
    assert not sharding.output_is_complete(tmp_path / "m.tif", (200, 100))
    assert not sharding.output_is_complete(tmp_path / "p.npy", (20, 10, 3))


# ----------------------------------------------------------------------------------------------
# inference.py --part and --skip_existing
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, shape in enumerate([(100, 90), (40, 50), (60, 60), (33, 71), (120, 64)]):
        tifffile.imwrite(folder / f"img_{i}.tif", random_image(shape, i))
    return folder


@pytest.fixture(scope="module")
def one_process(image_folder, tiny_unet, tmp_path_factory):
    output = tmp_path_factory.mktemp("one_process")
    summary = run(image_folder, output, tiny_unet)
    assert summary.ok_count == 5 and not summary.failed
    return output


def test_parts_write_the_masks_of_one_process(image_folder, tiny_unet, one_process, tmp_path, capsys):
    shares = []
    for index in range(2):
        summary = run(image_folder, tmp_path, tiny_unet, part=(index, 2))
        shares.append({pathlib.Path(p).name for p in summary.written})
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {f"img_{i}.tif" for i in range(5)}
    assert "part 1/2: " in capsys.readouterr().out
    for i in range(5):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / f"img_{i}.tif"),
                                      tifffile.imread(one_process / f"img_{i}.tif"))


def test_more_parts_than_images_leave_some_parts_empty(image_folder, tiny_unet, tmp_path):
    written = [run(image_folder, tmp_path, tiny_unet, part=(i, 7)).written for i in range(7)]
    assert sorted(len(w) for w in written) == [0, 0, 1, 1, 1, 1, 1]


def test_skip_existing_skips_complete_outputs_and_redoes_a_truncated_one(image_folder, tiny_unet,
                                                                         one_process, tmp_path):
    run(image_folder, tmp_path, tiny_unet, save_probabilities=True)
    truncated = tmp_path / "img_2.tif"
    truncated.write_bytes(truncated.read_bytes()[:-500])
    (tmp_path / "img_4_probabilities.npy").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    summary = run(image_folder, tmp_path, tiny_unet, save_probabilities=True, skip_existing=True)
    assert sorted(summary.skipped) == ["img_0.tif", "img_1.tif", "img_3.tif"]
    assert sorted(pathlib.Path(p).name for p in summary.written) == ["img_2.tif", "img_4.tif"]
    for name in ("img_0.tif", "img_1_probabilities.npy"):
        assert (tmp_path / name).stat().st_mtime_ns == before[name]
    np.testing.assert_array_equal(tifffile.imread(truncated), tifffile.imread(one_process / "img_2.tif"))
    assert np.load(tmp_path / "img_4_probabilities.npy").shape == (120, 64, CLASSES)


def test_two_images_with_one_stem_write_once_whichever_parts_they_fall_in(tiny_unet, tmp_path):
    # a.png is larger, so the pixel balance puts the two in different parts; before, each part
    # wrote its own a.tif and the later one silently replaced the other's mask. a.png comes first
    # in folder order, so it owns the outputs a.*, in one process as in parts.
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", random_image((60, 60), 1))
    iio.imwrite(tmp_path / "in" / "a.png", random_image((100, 200), 2))
    assert [len(sharding.select_part(sorted((tmp_path / "in").iterdir()), i, 2)[0]) for i in (0, 1)] == [1, 1]
    summaries = [run(tmp_path / "in", tmp_path / "out", tiny_unet, part=(i, 2)) for i in (1, 0)]
    assert sum(s.ok_count for s in summaries) == 1
    failed = {name: reason for s in summaries for name, reason in s.failed.items()}
    assert list(failed) == ["a.tif"]
    assert failed["a.tif"].startswith("a.tif: same stem as a.png: both would write a.* in the output folder")
    assert tifffile.imread(tmp_path / "out" / "a.tif").shape == (100, 200)
    alone = run(tmp_path / "in", tmp_path / "one", tiny_unet)
    assert alone.ok_count == 1 and list(alone.failed) == ["a.tif"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "a.tif"),
                                  tifffile.imread(tmp_path / "one" / "a.tif"))


def test_banded_image_equals_the_one_process_result_bit_for_bit(tiny_unet, tmp_path, monkeypatch):
    # Small chunks so a small image has several bands (the rule is the same at 512 rows).
    monkeypatch.setattr(writers, "ZARR_CHUNK", 32)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", random_image((150, 70), 7))
    whole = run(tmp_path / "in", tmp_path / "whole", tiny_unet, save_probabilities=True)
    assert whole.ok_count == 1
    outputs = tmp_path / "banded"
    # The last part first: whichever part comes first creates the shared array.
    for index in (2, 0, 1):
        summary = run(tmp_path / "in", outputs, tiny_unet, part=(index, 3), save_probabilities=True)
        assert summary.ok_count == 1 and not summary.failed
    labels = zarr.open_array(str(outputs / "slide.zarr"), mode="r")
    assert labels.chunks == (32, 32)
    np.testing.assert_array_equal(labels[:], tifffile.imread(tmp_path / "whole" / "slide.tif"))
    np.testing.assert_array_equal(zarr.open_array(str(outputs / "slide_probabilities.zarr"))[:],
                                  np.load(tmp_path / "whole" / "slide_probabilities.npy"))
    assert sharding.bands_done(outputs, "slide", 3) == [0, 1, 2]
    # A rerun of a finished band with --skip_existing does nothing; without a marker it is redone.
    sharding.band_marker(outputs, "slide", 1, 3).unlink()
    assert run(tmp_path / "in", outputs, tiny_unet, part=(0, 3), skip_existing=True).skipped == ["slide.tif"]
    assert run(tmp_path / "in", outputs, tiny_unet, part=(1, 3), skip_existing=True).ok_count == 1


def test_band_markers_count_only_for_the_arrays_they_were_written_into(tiny_unet, tmp_path, monkeypatch):
    # Before, a marker alone made --skip_existing skip its band: with the shared arrays removed, every
    # part skipped and the summary counted the image done with no output at all.
    monkeypatch.setattr(writers, "ZARR_CHUNK", 32)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", random_image((100, 60), 5))
    run(tmp_path / "in", tmp_path / "whole", tiny_unet)
    outputs = tmp_path / "banded"
    for index in (0, 1):
        assert run(tmp_path / "in", outputs, tiny_unet, part=(index, 2), save_probabilities=True).ok_count == 1
    assert sharding.image_done(tmp_path / "in" / "slide.tif", outputs, 2, banded=True)
    import shutil
    shutil.rmtree(outputs / "slide.zarr")
    assert not sharding.image_done(tmp_path / "in" / "slide.tif", outputs, 2, banded=True)
    # The first rerun recreates the arrays; the second must not trust its marker from the old ones.
    reruns = [run(tmp_path / "in", outputs, tiny_unet, part=(i, 2), save_probabilities=True, skip_existing=True)
              for i in (0, 1)]
    assert [r.ok_count for r in reruns] == [1, 1] and not any(r.skipped for r in reruns)
    np.testing.assert_array_equal(zarr.open_array(str(outputs / "slide.zarr"), mode="r")[:],
                                  tifffile.imread(tmp_path / "whole" / "slide.tif"))
    assert sharding.image_done(tmp_path / "in" / "slide.tif", outputs, 2, banded=True)
    assert run(tmp_path / "in", outputs, tiny_unet, part=(1, 2), save_probabilities=True,
               skip_existing=True).skipped == ["slide.tif"]
    # Another image under the same name: not skipped and not done, refused by name.
    tifffile.imwrite(tmp_path / "in" / "slide.tif", random_image((140, 60), 6))
    assert not sharding.image_done(tmp_path / "in" / "slide.tif", outputs, 2, banded=True)
    again = run(tmp_path / "in", outputs, tiny_unet, part=(0, 2), save_probabilities=True, skip_existing=True)
    assert not again.skipped and "it is from another run; remove it" in again.failed["slide.tif"]


def test_a_banded_image_is_ranked_once_its_last_band_is_written(tiny_unet, tmp_path, monkeypatch):
    # Before, a band carried no uncertainty and the one image of a banded run was never ranked.
    monkeypatch.setattr(writers, "ZARR_CHUNK", 32)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", random_image((100, 60), 5))
    run(tmp_path / "in", tmp_path / "whole", tiny_unet, uncertainty_csv=str(tmp_path / "whole.csv"))
    ranking = tmp_path / "banded.csv"
    run(tmp_path / "in", tmp_path / "banded", tiny_unet, part=(1, 2), uncertainty_csv=str(ranking))
    assert ranking.read_text().splitlines() == ["rank,image,mean_entropy,uncertain_share,pixels"]
    run(tmp_path / "in", tmp_path / "banded", tiny_unet, part=(0, 2), uncertainty_csv=str(ranking))
    whole, banded = (list(csv.DictReader(open(path))) for path in (tmp_path / "whole.csv", ranking))
    assert len(banded) == 1 and banded[0]["image"] == "slide.tif" and banded[0]["pixels"] == "6000"
    for column in ("mean_entropy", "uncertain_share"):
        assert float(banded[0][column]) == pytest.approx(float(whole[0][column]), abs=2e-6)
    assert 0 < float(whole[0]["mean_entropy"]) < 1


def test_a_shared_output_of_another_image_is_refused_by_name(tiny_unet, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", random_image((90, 40), 3))
    zarr.create_array(store=str(tmp_path / "out" / "slide.zarr"), shape=(10, 10), chunks=(5, 5),
                      dtype=np.uint8)
    summary = run(tmp_path / "in", tmp_path / "out", tiny_unet, part=(1, 2))  # part 0: no rows
    assert "slide.tif" in summary.failed
    assert "holds a uint8 array of shape (10, 10)" in summary.failed["slide.tif"]
    assert "remove it and rerun the parts" in capsys.readouterr().err


def test_bad_part_flag_exits_2_before_anything_is_written(tiny_unet, image_folder, tmp_path, capsys):
    code = inference.main(["--model", str(tiny_unet), "--image_folder", str(image_folder),
                           "--output_folder", str(tmp_path / "out"), "--part", "2/2"])
    assert code == inference.EXIT_CANNOT_START
    assert "--part 2/2: I must be in 0..N-1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    args = inference.build_parser().parse_args(["--model", "m", "--image_folder", "i", "--output_folder",
                                                "o", "--part", "1/3", "--skip_existing"])
    config = inference.config_from_args(args)
    assert (config.part, config.skip_existing) == ((1, 3), True)
    assert os.path.basename(config.model) == "m"


def test_parts_and_reruns_add_to_one_uncertainty_ranking(image_folder, tiny_unet, one_process, tmp_path):
    ranking = tmp_path / "ranking.csv"
    outputs = tmp_path / "out"
    for index in range(2):
        run(image_folder, outputs, tiny_unet, part=(index, 2), uncertainty_csv=str(ranking))
    rows = ranking.read_text().splitlines()
    assert rows[0] == "rank,image,mean_entropy,uncertain_share,pixels"
    assert sorted(row.split(",")[1] for row in rows[1:]) == [f"img_{i}.tif" for i in range(5)]
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4", "5"]
    # A rerun that skips every image keeps their rows; a row of an image gone from the folder goes.
    ranking.write_text(ranking.read_text() + "6,gone.tif,0.9,0.9,10\n")
    summary = run(image_folder, outputs, tiny_unet, skip_existing=True, uncertainty_csv=str(ranking))
    assert len(summary.skipped) == 5
    assert ranking.read_text().splitlines() == rows
    # An image with outputs but no row (segmented before without --uncertainty_csv) is segmented
    # again rather than left out of the ranking.
    ranking.write_text("\n".join(row for row in rows if ",img_3.tif," not in row) + "\n")
    summary = run(image_folder, outputs, tiny_unet, skip_existing=True, uncertainty_csv=str(ranking))
    assert len(summary.skipped) == 4 and [pathlib.Path(p).name for p in summary.written] == ["img_3.tif"]
    assert sorted(ranking.read_text().splitlines()) == sorted(rows)


def test_a_file_that_is_not_a_ranking_is_refused_before_any_image_and_kept(image_folder, tiny_unet, tmp_path):
    notes = tmp_path / "notes.csv"
    notes.write_text("sample,comment\nA1,bright\n")
    with pytest.raises(inference.InferenceError, match="notes.csv: exists and is not a ranking"):
        run(image_folder, tmp_path / "out", tiny_unet, uncertainty_csv=str(notes))
    assert notes.read_text() == "sample,comment\nA1,bright\n"
    assert not (tmp_path / "out").exists()


def test_folders_that_cannot_be_read_or_written_stop_the_run_before_any_image(image_folder, tiny_unet,
                                                                               tmp_path, monkeypatch):
    # /proc exists, but no file can be created in it, not even by root (CI runs as root, so chmod
    # cannot make a folder unwritable there). Before, the folder was segmented and the ranking then
    # failed with a traceback.
    with pytest.raises(inference.InferenceError, match=r"--uncertainty_csv /proc/ranking.csv: cannot write "
                                                       r"beside it \(/proc/.ranking.csv.lock: "):
        run(image_folder, tmp_path / "out", tiny_unet, uncertainty_csv="/proc/ranking.csv")
    assert not (tmp_path / "out").exists()

    def refuse(folder, extensions):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(image_io, "list_files", refuse)
    with pytest.raises(inference.InferenceError, match=f"--image_folder {image_folder}: cannot list its files "
                                                       r"\(Permission denied\)"):
        run(image_folder, tmp_path / "out", tiny_unet)
    assert not (tmp_path / "out").exists()


RANK_MANY = """
import sys, uncertainty
path, prefix = sys.argv[1], sys.argv[2]
keep = [f"{p}{j}.tif" for p in "ab" for j in range(40)]
for i in range(40):
    uncertainty.write_ranking(path, [{"image": f"{prefix}{i}.tif", "mean_entropy": 0.01 * i,
                                      "uncertain_share": 0.0, "pixels": 4}], keep=keep)
"""


def test_concurrent_parts_lose_no_ranking_row(tmp_path):
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    workers = [subprocess.Popen([sys.executable, "-c", RANK_MANY, str(tmp_path / "r.csv"), prefix], cwd=root)
               for prefix in "ab"]
    assert [worker.wait(120) for worker in workers] == [0, 0]
    names = [row.split(",")[1] for row in (tmp_path / "r.csv").read_text().splitlines()[1:]]
    assert sorted(names) == sorted(f"{p}{j}.tif" for p in "ab" for j in range(40))
