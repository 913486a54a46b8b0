"""Segment whole images of any size, also larger than memory, with a trained UNet or SegNet.

    python inference.py --model runs/unet --image_folder my_images --output_folder my_masks
    python inference.py --model fold0 fold1 fold2 --tta ...     # ensemble, test-time augmentation

Input: every image file of --image_folder (TIFF, PNG, JPEG; OME-TIFF and pyramidal TIFF at full
resolution) and every Zarr / OME-Zarr folder (``*.zarr``) in it; --image_folder may also be one
``.zarr`` folder. TIFF and Zarr are read lazily, a band of tile rows at a time: an uncompressed
TIFF is read by rows, a tiled / compressed / pyramidal TIFF and Zarr are read by chunks
(tifffile's ``aszarr``), so an image larger than memory can be segmented. PNG/JPEG are read whole.

Each image is z-score normalised per channel with the statistics of the whole image (computed in a
streaming pass, normalization.py: the same values as in training), reflect-padded to a size the
network accepts and predicted by the tiled predictor (predictor.py): overlapping tiles whose halo
covers the receptive field, only each tile's centre kept, so the result equals one whole-image pass
(no seams). By default the tile is the largest the free memory allows (GPU memory on a GPU, else
RAM; predictor.default_tile_size), shrunk per image to the smallest size needing as many tiles.

Output, in --output_folder, per image ``<stem>``:
  - ``<stem>.tif``: class ids (uint8, uint16 above 256 classes), H x W. Images with more than
    writers.STREAM_PIXELS pixels (2048 x 2048) are written progressively as a tiled (256 px),
    zlib-compressed BigTIFF, so memory holds a few bands of tiles, never the whole mask.
  - ``<stem>.zarr`` instead when the input was Zarr: a Zarr array H x W, chunks 512 x 512.
  - with --save_probabilities, the softmax maps H x W x classes float32: ``<stem>_probabilities.npy``
    for images up to writers.STREAM_PIXELS read from files (numpy.load), else (and for Zarr input)
    ``<stem>_probabilities.zarr`` (a Zarr array, chunks 512 x 512 x classes), written band by band.
Every output is written to a temporary file or folder beside the target and renamed over it when
complete, so an existing output is only ever replaced by a complete new one.

--tta averages the softmax over the 8 flips / quarter turns of every tile (each undone exactly),
--model A B C averages the softmax of several models (same classes, channels and architecture).

An image that cannot be read (also a damaged one whose read fails midway), has the wrong number of
channels or holds NaN/Inf pixels is reported (naming the file) and skipped; the others are still
processed, and the exit code is 1 if any image failed. A run that cannot start (model, flags,
folders) exits with code 2. SIGTERM (scancel, a Slurm time limit, preemption) or SIGINT (Ctrl-C)
stops the run within a tile batch: the interrupted image's partial output is removed, the masks
already written stay, and the exit code is 143 / 130. Scratch left in --output_folder by a run that
was killed outright (SIGKILL) is removed by the next run.

This file is the CLI and the folder loop; images are opened by image_io.open_image, outputs written
by writers.py, models loaded by checkpoints.load_models and predicted by predictor.py.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf

import checkpoints
import engines
import image_io
import models
import predictor
import progress
import sharding
import uncertainty
import writers
from errors import ImageError, InferenceError

# A progress line at most this often (seconds) while an image is predicted.
PROGRESS_SECONDS = 15.0
EXIT_IMAGE_FAILED, EXIT_CANNOT_START = 1, 2


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (raised by main's handler in the main thread). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it, while every
    ``except BaseException``/``finally`` that removes scratch still runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.image = None  # the image being segmented, set by run_inference
        self.after_images = False  # set by run_inference when every image had been handled


@dataclasses.dataclass
class InferenceConfig:
    """Everything one inference run needs (the CLI flags as plain values).

    Exactly one of ``model`` (a .keras file or a training output folder holding model.keras) and
    ``checkpoint_filepath`` (a checkpoint directory holding model.weights.h5, or a training output
    folder) is set; either may be a list of paths: an ensemble whose softmax is averaged.
    ``tile_size`` None -> predictor.default_tile_size (from the free memory of the device).
    ``gpu`` None -> the first GPU if there is one, else the CPU; -1 -> the CPU.
    """
    image_folder: str
    output_folder: str
    model: str | list | None = None
    checkpoint_filepath: str | list | None = None
    tile_size: int | None = None
    batch_size: int = 1
    gpu: int | None = None
    save_probabilities: bool = False
    tta: bool = False
    image_extensions: tuple = image_io.IMAGE_EXTENSIONS
    # (I, N): this process segments part I of N (sharding.py); a single image is split into row bands.
    part: tuple | None = None
    skip_existing: bool = False
    engine: str = "tensorflow"  # or "onnxruntime" (engines.py): same tiles, halos, TTA, ensembles
    precision: str = "float32"  # or "bfloat16" / "float16": the TensorFlow engine under a mixed policy
    uncertainty_csv: str | None = None  # rank the images by uncertainty here (uncertainty.py)


@dataclasses.dataclass
class InferenceSummary:
    """Outcome of run_inference: output paths written and failed input names with their reasons."""
    written: list
    failed: dict
    seconds: float
    skipped: list = dataclasses.field(default_factory=list)  # inputs whose complete outputs existed

    @property
    def ok_count(self):
        return len(self.written)

    @property
    def failed_count(self):
        return len(self.failed)


# ----------------------------------------------------------------------------------------------
# One image: read, predict, write
# ----------------------------------------------------------------------------------------------

def resolve_device(gpu):
    """TensorFlow device string for --gpu (None -> first GPU if any, else CPU; -1 -> CPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpu is not None and gpu >= len(gpus):
        raise InferenceError(f"--gpu {gpu}: only {len(gpus)} GPU(s) visible to TensorFlow "
                             f"(valid: {list(range(len(gpus)))} or -1 for the CPU)")
    if not gpus or (gpu is not None and gpu < 0):
        chosen, device = [], "/CPU:0"
    else:
        index = gpu or 0
        chosen, device = [gpus[index]], f"/GPU:{index}"
    try:
        # Hide the other GPUs so this process reserves no memory on them (a training run may be
        # using them). Only possible before TensorFlow starts its runtime, as in a fresh CLI process.
        tf.config.set_visible_devices(chosen, "GPU")
    except RuntimeError:
        return device
    return "/GPU:0" if chosen else "/CPU:0"


def softmax(logits):
    """Per-pixel class probabilities of H x W x classes logits (float32)."""
    return predictor._softmax(logits).astype(np.float32)


def _outputs(number_classes, save_probabilities):
    """What iter_bands keeps of each tile's logits: class ids, and the probabilities if saved."""
    def labels_of(logits):
        return np.argmax(logits, axis=-1).astype(writers.label_dtype(number_classes))

    return [labels_of] + ([softmax] if save_probabilities else [])


@contextlib.contextmanager
def _image_errors(path, tile_size, config):
    """Out of memory and unwritable outputs as ImageError naming the image: the run goes on."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as exc:
        raise ImageError(f"{path.name}: out of memory with {tile_size} px tiles in batches of "
                         f"{config.batch_size}; use a smaller --tile_size or --batch_size") from exc
    except OSError as exc:
        raise ImageError(f"{path.name}: cannot write its output: {exc}") from exc


def _tile_progress(name, pixels):
    """A progress callback for predictor.iter_bands: a line at most every PROGRESS_SECONDS with the
    tiles done, the rate in tiles and megapixels per second and the time remaining, none for short
    images and none at the end (the image's own line follows)."""
    line = None

    def report(done, total):
        nonlocal line
        if line is None:
            # The clock starts after the first network call, so tracing does not skew the rate.
            line = progress.ProgressLine(total, unit="tile", interval=PROGRESS_SECONDS, label=f"    {name}: ",
                                         per_unit={"Mpx": pixels / total / 1e6}, final=False)
        line.update(done)

    return report


def _interruptible(forward, device):
    """``forward`` run in a helper thread while the main thread waits for it.

    Python runs a signal handler only in the main thread, between bytecodes: during one network call
    SIGTERM would wait for the call to end, about 2 minutes for the default UNet on a 2,368 px tile
    on a 2-core CPU (measured), past Slurm's usual 30 s before SIGKILL. A main thread waiting here
    handles it at once; the call still running is abandoned (see the end of this file).
    """
    def call(batch):
        outcome = {}

        def work():
            try:
                with tf.device(device):  # device scopes are per thread
                    outcome["logits"] = forward(batch)
            except BaseException as exc:  # handed to the main thread, e.g. ResourceExhaustedError
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="inference-forward", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["logits"]

    return call


def _tallied(bands, tally):
    """``bands`` (predictor.iter_bands') unchanged, each band's entropies (its last result) added to
    ``tally`` on the way; ``tally`` None: unchanged, nothing added."""
    for band in bands:
        if tally is not None:
            tally.add(band[2][-1])
        yield band


def _segment_file(path, output_folder, loaded, forward, tile_size, device, config, tally=None):
    """Read, normalise, predict and write one image. Returns (outputs written, description).
    ``tally``: an uncertainty.ImageUncertainty fed with every pixel's normalised entropy, or None.

    Every per-image problem (unreadable, wrong channels, NaN, out of memory, unwritable output) is
    raised as ImageError naming the file, so the caller can go on with the next image.
    """
    first = loaded[0]
    source = image_io.open_image(path, first.input_channels)
    try:
        height, width, channels = source.shape
        # Statistics of the whole image, exactly as training normalises each source image, so that
        # every tile sees the same values and tiling cannot change the result.
        stats = image_io.image_statistics(source, path.name)
        stem = image_io.image_stem(path)
        zarr_out = image_io.is_zarr_folder(path)
        streamed = writers.is_streamed(path, height, width)
        outputs = _outputs(first.number_classes, config.save_probabilities)
        if tally is not None:  # last, so the writers' results[0] / results[1] stay as they are
            outputs.append(uncertainty.normalized_entropy)
        tiles = predictor.count_tiles(height, width, first.geometry, tile_size)
        report = _tile_progress(path.name, height * width)

        def bands():
            with tf.device(device):
                yield from _tallied(predictor.iter_bands(_interruptible(forward, device), source, stats,
                                                         first.geometry, tile_size, config.batch_size,
                                                         config.tta, outputs=outputs, progress=report), tally)

        with _image_errors(path, tile_size, config):
            if streamed:
                targets = writers.write_streamed(bands(), output_folder, stem, zarr_out, (height, width),
                                                 first.number_classes, config.save_probabilities)
            else:
                targets = writers.write_whole(bands(), output_folder, stem, (height, width),
                                              first.number_classes, config.save_probabilities)
    finally:
        source.close()
    layout = "tiled BigTIFF" if streamed and not zarr_out else "Zarr" if zarr_out else "TIFF"
    return targets, (f"{height}x{width}x{channels} {source.dtype} {source.kind} ({tiles} tile(s)"
                     f"{', TTA' if config.tta else ''}) -> {layout}")


def _segment_band(path, output_folder, loaded, forward, tile_size, device, config):
    """Predict and write part I of N of one image: its row band, into the shared ``<stem>.zarr`` (and
    ``<stem>_probabilities.zarr``). Band borders are on Zarr chunk rows, so parts never write the
    same chunk; the tile plan is the whole image's, so each band equals those rows of a one-process
    run. A marker written last (sharding.write_band_marker) says the band is complete; with
    --uncertainty_csv it carries the band's uncertainty sums, and the part that finds every band
    complete combines them into the image's.

    Returns (outputs, description, skipped, tally): tally is the whole image's
    uncertainty.ImageUncertainty once every band holds its sums, else None.
    """
    index, count = config.part
    first = loaded[0]
    source = image_io.open_image(path, first.input_channels)
    try:
        height, width, channels = source.shape
        stem = image_io.image_stem(path)
        lo, hi = sharding.band_rows(height, index, count, writers.ZARR_CHUNK)
        targets = [output_folder / (stem + ".zarr")]
        if config.save_probabilities:
            targets.append(output_folder / (stem + writers.PROBABILITIES_ZARR_SUFFIX))
        band = f"rows {lo}-{hi} of {height}x{width}x{channels} (band {index}/{count})"
        # The marker must name the arrays there now, and they must fit this image (one of another
        # size is refused by open_shared_zarr below, not skipped).
        if (config.skip_existing and sharding.band_complete(output_folder, stem, index, count, targets)
                and all(sharding.output_is_complete(target, shape) for target, shape in
                        zip(targets, [(height, width), (height, width, first.number_classes)]))):
            return targets, f"{band}: marked complete", True, None
        tally = uncertainty.ImageUncertainty() if config.uncertainty_csv else None
        if lo == hi:  # more parts than chunk rows: nothing to predict, but the arrays must exist
            writers.write_shared_band(iter(()), targets, (height, width), first.number_classes, start=lo)
        else:
            # Every part computes the whole image's statistics: normalisation must not depend on the band.
            stats = image_io.image_statistics(source, path.name)
            outputs = _outputs(first.number_classes, config.save_probabilities)
            if tally is not None:  # last: write_shared_band takes the results it has arrays for
                outputs.append(uncertainty.normalized_entropy)
            with _image_errors(path, tile_size, config), tf.device(device):
                bands = predictor.iter_bands(
                    _interruptible(forward, device), source, stats, first.geometry, tile_size,
                    config.batch_size, config.tta, outputs=outputs,
                    progress=_tile_progress(path.name, width * (hi - lo)), rows=(lo, hi))
                writers.write_shared_band(_tallied(bands, tally), targets, (height, width),
                                          first.number_classes, start=lo)
        sharding.write_band_marker(output_folder, stem, index, count, (lo, hi), targets,
                                   None if tally is None else tally.sums())
    finally:
        source.close()
    done = sharding.bands_done(output_folder, stem, count)
    state = "all bands written" if len(done) == count else f"{len(done)} of {count} bands written"
    description = f"{band}: empty band" if lo == hi else f"{band} -> shared Zarr ({state})"
    whole = None
    if tally is not None and len(done) == count:
        sums = sharding.band_sums(output_folder, stem, count)
        whole = None if sums is None else uncertainty.ImageUncertainty.combined(sums)
    return targets, description, False, whole


def resolve_tile_size(requested, loaded, batch_size, device):
    """Tile side to use: the requested one (validated), else predictor.default_tile_size for the
    free memory of ``device`` (its memory is asked for by the physical index, e.g. "/GPU:1")."""
    geometry = loaded[0].geometry
    if requested is None:
        return predictor.default_tile_size([m.model for m in loaded], geometry, batch_size, device=device)
    halo = geometry.halo
    if requested < geometry.smallest_tile or requested % geometry.size_divisor:
        raise InferenceError(
            f"--tile_size {requested}: must be a multiple of {geometry.size_divisor} and at least "
            f"{geometry.smallest_tile} for {geometry.name} (a halo of {halo} px on each side covers its "
            f"receptive field of {geometry.receptive_field} px); larger tiles are faster, e.g. {8 * halo}")
    return requested


def _check_run(config):
    """Refuse what cannot run before anything is loaded or written.

    Returns (image_folder, output_folder, images): the two folders as paths and the images found."""
    if config.batch_size < 1:
        raise InferenceError(f"--batch_size {config.batch_size}: must be at least 1")
    try:
        engines.check_choice(config.engine, config.precision)
    except engines.EngineError as exc:
        raise InferenceError(str(exc)) from exc
    image_folder = pathlib.Path(config.image_folder)
    output_folder = pathlib.Path(config.output_folder)
    if not image_folder.is_dir():
        raise InferenceError(f"--image_folder {image_folder}: folder not found")
    if output_folder.exists() and not output_folder.is_dir():
        raise InferenceError(f"--output_folder {output_folder} is an existing file, not a folder: "
                             f"give a folder (it is created if missing)")
    if output_folder.resolve() == image_folder.resolve():
        raise InferenceError(f"--output_folder {output_folder} is the image folder: masks named "
                             f"<stem>.tif would overwrite the input TIFFs")
    try:
        images = image_io.list_images(image_folder, config.image_extensions)
    except OSError as exc:  # e.g. a folder without read permission
        raise InferenceError(f"--image_folder {image_folder}: cannot list its files ({exc.strerror})") from exc
    if not images:
        raise InferenceError(f"no images with extensions {','.join(config.image_extensions)} "
                             f"in {image_folder}")
    for path in images:  # e.g. --image_folder P/slide.zarr --output_folder P: its mask is P/slide.zarr
        for suffix in (".tif", ".zarr", writers.PROBABILITIES_SUFFIX, writers.PROBABILITIES_ZARR_SUFFIX):
            if (output_folder / (image_io.image_stem(path) + suffix)).resolve() == path.resolve():
                raise InferenceError(f"--output_folder {output_folder}: the outputs of {path.name} would be "
                                     f"written over the image itself ({path}); give another --output_folder")
    if config.uncertainty_csv:
        if not os.path.isdir(os.path.dirname(os.path.abspath(config.uncertainty_csv))):
            raise InferenceError(f"--uncertainty_csv {config.uncertainty_csv}: its folder does not exist")
        try:  # refuse a file that is not a ranking, or a folder we cannot write, now, not at the end
            uncertainty.read_ranking(config.uncertainty_csv)
            uncertainty.check_writable(config.uncertainty_csv)
        except uncertainty.RankingError as exc:
            raise InferenceError(str(exc)) from exc
    return image_folder, output_folder, images


def _prepare(config, device, output_folder):
    """Load the model(s), choose the tile size and create the output folder.

    Returns (loaded, tile_size): checkpoints.load_models's list and the largest tile side."""
    with tf.device(device):
        loaded = checkpoints.load_models(config.model, config.checkpoint_filepath)
    # resolve_device renumbers the chosen GPU as GPU:0; its free memory is that of --gpu.
    memory_device = f"/GPU:{config.gpu or 0}" if "GPU" in device else "/CPU:0"
    tile_size = resolve_tile_size(config.tile_size, loaded, config.batch_size, memory_device)
    try:
        output_folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"--output_folder {output_folder}: cannot create it: {exc}") from exc
    try:  # now, not after the first image's prediction
        tempfile.TemporaryFile(dir=output_folder).close()
    except OSError as exc:
        raise InferenceError(f"--output_folder {output_folder}: cannot write there ({exc.strerror})") from exc
    for action in image_io.remove_stale_scratch(output_folder):
        print(action)
    return loaded, tile_size


def _announce(config, loaded, device, tile_size, images, image_folder, output_folder):
    for member in loaded:
        print(f"model: {member.source} ({member.name}, {member.input_channels} channel(s) in, "
              f"{member.number_classes} classes out)")
    print(f"engine: {config.engine}"
          f"{f' in {config.precision}' if config.precision != 'float32' else ''}; "
          f"device: {device}; tiles up to {tile_size} px, halo {loaded[0].geometry.halo} px, "
          f"batch {config.batch_size}"
          f"{', test-time augmentation (8 transforms)' if config.tta else ''}"
          f"{f', ensemble of {len(loaded)} models' if len(loaded) > 1 else ''}; "
          f"{len(images)} image(s) from {image_folder} -> {output_folder}")


def _segment_image(path, banded, output_folder, loaded, forward, tile_size, device, config, ranked=None):
    """Segment one image, or this part's band of it when ``banded``.

    Returns (targets, description, tally): the output paths, a description of the input and the
    image's uncertainty (None without --uncertainty_csv, and for a band until every band is written
    with its sums); targets is None when the
    complete outputs already exist (--skip_existing, or a band another run finished), description
    then says so; an image missing from ``ranked`` (the names in the existing --uncertainty_csv) is
    not skipped. Raises ImageError for this image's problems, Interrupted on a signal.
    """
    if banded:
        targets, description, was_done, tally = _segment_band(path, output_folder, loaded, forward,
                                                              tile_size, device, config)
        return (None, f"{description}: skipped", None) if was_done else (targets, description, tally)
    first = loaded[0]
    if (config.skip_existing and (ranked is None or path.name in ranked)
            and writers.outputs_complete(path, output_folder, first.input_channels, first.number_classes,
                                         config.save_probabilities)):
        return None, "complete outputs exist, skipped", None
    tally = uncertainty.ImageUncertainty() if config.uncertainty_csv else None
    targets, description = _segment_file(path, output_folder, loaded, forward, tile_size, device, config,
                                         tally)
    return targets, description, tally


def _finish(config, output_folder, summary, ranking, folder_images):
    """Write the uncertainty ranking (if asked for) and print the run's last lines."""
    if config.uncertainty_csv:
        try:
            ranked = uncertainty.write_ranking(config.uncertainty_csv, ranking, keep=folder_images)
        except uncertainty.RankingError as exc:
            raise InferenceError(str(exc)) from exc
        print(f"uncertainty: {len(ranked)} image(s) ranked ({len(ranking)} segmented in this run), most "
              f"uncertain first, in {config.uncertainty_csv}")
    skipped = summary.skipped
    print(f"done: {summary.ok_count} mask(s) written to {output_folder}, {summary.failed_count} "
          f"failed{f', {len(skipped)} skipped (complete)' if skipped else ''}, {summary.seconds:.1f} s")
    if summary.failed:
        print(f"failed: {', '.join(summary.failed)}", file=sys.stderr)


def run_inference(config):
    """Segment every image of config.image_folder into config.output_folder.

    Returns:
      InferenceSummary. Raises InferenceError when the run cannot start (model, flags, folders);
      per-image problems are recorded in summary.failed and printed to stderr.
    """
    start_time = time.perf_counter()
    image_folder, output_folder, images = _check_run(config)
    folder_images = [path.name for path in images]  # an uncertainty ranking keeps rows of these only
    # --skip_existing with a ranking: an image with outputs but no row (segmented without
    # --uncertainty_csv) is segmented again, or the ranking would silently leave it out.
    ranked = ({row["image"] for row in uncertainty.read_ranking(config.uncertainty_csv)}
              if config.uncertainty_csv and config.skip_existing else None)
    owners = image_io.stem_owners(images)  # of the whole folder, as every part sees it
    banded = config.part is not None and config.part[1] > 1 and len(images) == 1
    if config.part is not None and not banded:
        images, part_pixels, all_pixels = sharding.select_part(images, *config.part)
        print(f"part {config.part[0]}/{config.part[1]}: {len(images)} image(s), "
              f"{part_pixels / 1e6:.2f} of {all_pixels / 1e6:.2f} Mpx")
        if not images:
            return InferenceSummary(written=[], failed={}, seconds=time.perf_counter() - start_time)

    device = resolve_device(config.gpu)
    loaded, tile_size = _prepare(config, device, output_folder)
    _announce(config, loaded, device, tile_size, images, image_folder, output_folder)
    try:
        forward = engines.make_forward(config.engine, loaded, precision=config.precision)
    except engines.EngineError as exc:
        raise InferenceError(str(exc)) from exc
    warning = engines.precision_warning(config.precision, device, gpu_index=config.gpu or 0)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    written, failed, skipped, ranking = [], {}, [], []
    for index, path in enumerate(images, start=1):
        image_start = time.perf_counter()
        counter = f"[{index}/{len(images)}]"
        stem = image_io.image_stem(path)
        try:
            if owners[stem] != path.name:
                raise ImageError(f"{path.name}: same stem as {owners[stem]}: both would write {stem}.* in "
                                 f"the output folder; rename one (only {owners[stem]} is segmented)")
            targets, description, tally = _segment_image(path, banded, output_folder, loaded, forward,
                                                         tile_size, device, config, ranked)
        except ImageError as exc:
            failed[path.name] = str(exc)
            print(f"{counter} FAILED {exc}", file=sys.stderr, flush=True)
            continue
        except Interrupted as exc:
            exc.image = path.name
            raise
        if targets is None:
            skipped.append(path.name)
            print(f"{counter} {path.name}{'' if banded else ':'} {description}", flush=True)
            continue
        written.append(str(targets[0]))
        if tally is not None:
            ranking.append(tally.row(path.name))
        elapsed = time.perf_counter() - start_time
        eta = (f", folder ETA {progress.format_clock(elapsed / index * (len(images) - index))}"
               if len(images) - index > 1 else "")
        print(f"{counter} {path.name} {description} {targets[0].name} "
              f"({time.perf_counter() - image_start:.2f} s{eta})", flush=True)

    try:
        summary = InferenceSummary(written=written, failed=failed, seconds=time.perf_counter() - start_time,
                                   skipped=skipped)
        _finish(config, output_folder, summary, ranking, folder_images)
    except Interrupted as exc:
        exc.after_images = True
        raise
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _side(pixels):
    side = int(pixels ** 0.5)
    return f"{side} x {side}"


def build_parser():
    halos = {name: models.geometry(name).halo for name in models.MODEL_NAMES}
    parser = argparse.ArgumentParser(
        description="Segment every image of a folder (any size, also larger than memory) with a "
                    "trained model or an ensemble; writes <stem>.tif class masks (uint8, uint16 above "
                    "256 classes) of the same size into the output folder (tiled compressed BigTIFF "
                    f"above {_side(writers.STREAM_PIXELS)} px; <stem>.zarr for Zarr input). Exit "
                    "code 1: some image failed; 2: the run could not start; 143 / 130: stopped by "
                    "SIGTERM / SIGINT (the interrupted image's partial output removed).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", nargs="+", help="trained model(s): a .keras file, or a training "
                        "output folder (uses its model.keras); several: an ensemble averaging their "
                        "softmax (same classes, channels and architecture)")
    source.add_argument("--checkpoint_filepath", nargs="+", help="training checkpoint directory "
                        "holding model.weights.h5 (e.g. OUTPUT/checkpoints/latest), or a training "
                        "output folder (then its checkpoints/best, else checkpoints/latest); the model "
                        "is rebuilt from the output folder's config.json; several: an ensemble")
    parser.add_argument("--image_folder", required=True, help="folder of images to segment "
                        "(H x W or H x W x C; any integer or float pixel type; TIFF, OME-TIFF, "
                        "PNG, JPEG files and *.zarr (OME-)Zarr folders), or one .zarr folder")
    parser.add_argument("--output_folder", required=True,
                        help="where masks go (created if missing; must differ from --image_folder)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="largest tile side sent to the network, a multiple of 16 (UNet) or 32 "
                        "(SegNet), at least 2 halos + 16/32 px (the halo, half the receptive field "
                        f"rounded up, is {halos['unet']} px for UNet and {halos['segnet']} px for "
                        "SegNet); each image axis then uses the smallest tile needing as many tiles. "
                        "Default: the largest tile whose activations fit half the free memory (GPU "
                        f"memory on a GPU, else RAM), at most {predictor.MAX_DEFAULT_TILE}")
    parser.add_argument("--batch_size", type=int, default=1, help="tiles per network call (default "
                        "1: the default tile already fills the memory)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average the "
                        "softmax over the 8 flips / quarter turns of every tile (8x the compute)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="index of the GPU to run on; -1 for the CPU (default: first GPU if "
                        "any, else the CPU)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write the float32 H x W x classes softmax maps: "
                        "<stem>_probabilities.npy (numpy.load) for images up to "
                        f"{_side(writers.STREAM_PIXELS)} px, else and for Zarr input "
                        "<stem>_probabilities.zarr (zarr.open), written band by band")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="segment only part I of N (I from 0 to N-1) of the folder's images, "
                        "balanced by pixel count: run N processes (e.g. a Slurm array, "
                        "launch_inference_sbatch.sh) into the same --output_folder. A single image "
                        "is split into N row bands instead, written into one shared <stem>.zarr")
    parser.add_argument("--engine", choices=engines.ENGINES, default="tensorflow",
                        help="what runs the network: tensorflow (default; CPU or GPU) or onnxruntime "
                        "(CPU; the model is exported to ONNX once and cached beside it as "
                        "<model>.onnx); the same tiles, halos, --tta and ensembles, probabilities "
                        "within 1e-4 (docs/inference-at-scale.md has the measured speeds)")
    parser.add_argument("--precision", choices=engines.PRECISIONS, default="float32",
                        help="what the network computes in (--engine tensorflow): float32 (default), "
                        "or bfloat16 / float16 (UNet only; Keras's mixed policies; the logits and "
                        "everything after stay float32). bfloat16 is several times faster for wide "
                        "networks on CPUs with AMX (Xeon 4th generation and later) and on GPUs from "
                        "compute capability 8.0, float16 on GPUs from 7.0; the masks then differ from "
                        "float32's on a few pixels (measured in docs/inference-at-scale.md)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="skip images whose outputs exist complete (open, right shape, all data); "
                        "a missing or truncated output is redone, so a failed or preempted run "
                        "just reruns")
    image_io.add_extensions_flag(parser)
    parser.add_argument("--uncertainty_csv", default=None, metavar="PATH",
                        help="also write PATH: one row per image, most uncertain first (mean softmax "
                        "entropy in units of log(classes), share of pixels above "
                        f"{uncertainty.UNCERTAIN_ENTROPY}): correct those masks first and retrain "
                        "(docs/sparse-labels.md)")
    return parser


def config_from_args(args):
    """InferenceConfig from parsed command-line arguments."""
    extensions = image_io.parse_extensions(args.image_extensions)
    if not extensions:
        raise InferenceError(f"--image_extensions {args.image_extensions!r}: no extension given")

    def paths(value):
        return None if value is None else value[0] if len(value) == 1 else list(value)

    try:
        part = None if args.part is None else sharding.parse_part(args.part)
    except sharding.PartError as exc:
        raise InferenceError(str(exc)) from exc

    return InferenceConfig(image_folder=args.image_folder, output_folder=args.output_folder,
                           model=paths(args.model), checkpoint_filepath=paths(args.checkpoint_filepath),
                           tile_size=args.tile_size, batch_size=args.batch_size, gpu=args.gpu,
                           save_probabilities=args.save_probabilities, tta=args.tta,
                           image_extensions=extensions, part=part, skip_existing=args.skip_existing,
                           engine=args.engine, precision=args.precision,
                           uncertainty_csv=args.uncertainty_csv)


def _raise_interrupted(signum, frame):
    # Further signals are ignored while the scratch is removed; a second Ctrl-C would otherwise
    # break off the cleanup itself. main() restores the handlers.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv=None, owns_process=False):
    """Command-line entry point. Returns the exit code: 0 all written, 1 an image failed, 2 the run
    could not start (model, flags, folders), 128 + the signal number when SIGTERM (143) or SIGINT
    (130) stopped it.

    ``owns_process``: the run is the whole process (python inference.py), which exits once main
    returns. SIGTERM/SIGINT then stay ignored after the run instead of getting their previous handlers
    back: every mask is written, but Python and TensorFlow take seconds to shut down, and a job's
    time limit arriving then would turn the run's exit code into -15. Ignored, not handled: Python
    resets its own handlers early in its shutdown but leaves an ignored signal ignored (as
    trainer.train does for train_<model>.py)."""
    args = build_parser().parse_args(argv)
    # SIGTERM's default action ends the process at once, leaving the scratch file of the image being
    # written; raised as an exception instead, the writers' cleanup runs.
    previous = {number: signal.signal(number, _raise_interrupted)
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = config_from_args(args)
        print("config: " + json.dumps(dataclasses.asdict(config)))
        summary = run_inference(config)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except Interrupted as exc:
        where = (f"while segmenting {exc.image} (its partial output was removed)" if exc.image
                 else "after the last image (an --uncertainty_csv ranking may not be updated)"
                 if exc.after_images else "before any image was segmented")
        print(f"interrupted by {signal.Signals(exc.signum).name} {where}; the masks written before it "
              f"are complete", file=sys.stderr, flush=True)
        return 128 + exc.signum
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_IGN if owns_process else handler)
    return EXIT_IMAGE_FAILED if summary.failed_count else 0


if __name__ == "__main__":
    code = main(owns_process=True)
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        # A network call may still run in its helper thread (_interruptible): leave now, without
        # waiting for it or tearing TensorFlow down under it; this run's scratch is already removed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
