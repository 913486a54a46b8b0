"""Multiprocess batch reader: worker processes read an LMDB database, augment and batch its records.

Each worker is its own process (started with the "spawn" method, so no LMDB environment, TensorFlow
state or lock ever crosses a fork). A worker opens the database itself, then loops: take a free
slot of a shared-memory ring, read and decode records, crop them at random, augment (on the raw
stored values), normalise with the statistics of the record's whole
source image (normalization.normalize, the same values inference.py uses, so a pixel gets the
same network input whichever crop it is seen in), write a whole batch into the slot and put the
slot's index on its ready queue. The slot arithmetic lives in one place, ``RingLayout``.
The parent copies the batch out and hands the slot back. Shared memory is used instead of pickling
arrays through a ``multiprocessing.Queue`` because it is much cheaper for the parent, which must
stay nearly idle so the workers get the CPU: measured with 8 x 256 x 256 batches (images float32 +
masks int32, 4 MB), the parent spends about 0.5 ms per batch copying out of a slot against about
6.5 ms unpickling from a queue (15 ms wall per batch).

The parent consumes the workers in round-robin order of worker id, so the sequence of batches
depends only on the seed and the worker count, never on which worker happened to finish first.

Nothing here imports TensorFlow: the workers import this module, and every import costs start-up
time in every worker.
"""
import atexit
import contextlib
import math
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
import traceback
import types
import uuid
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory

import numpy as np

import augment
import normalization
import records

# /dev/shm segments are named SHM_PREFIX + "<parent pid>_<random>", so leaks are easy to spot.
SHM_PREFIX = "segreader_"
# Where POSIX shared memory lives on Linux (a tmpfs of limited size, e.g. in containers).
SHM_DIR = "/dev/shm"
STARVATION_MESSAGE = "Input Queue Starvation !!!!"
STARVATION_OVER_MESSAGE = "Input Queue Starvation Over"

_POLL_SECONDS = 0.2  # how often blocked workers and the waiting parent look for stop / death
_LIVENESS_SECONDS = 0.5  # how often the parent checks the workers while batches keep flowing
_SHUTDOWN_SECONDS = 5.0  # budget for workers to stop by themselves before they are terminated
# The segment starts with a control block whose first byte is the stop flag, then the slots. A
# plain byte rather than a multiprocessing.Event: an Event takes a lock shared by every process, and
# a worker killed while holding it would hang the others and the parent's shutdown.
_CONTROL_BYTES = 64
# Training crops redrawn while they hold no annotated pixel (sparse masks); bounded, see
# _annotated_crop_origin (a draw costs one comparison over the crop's mask pixels).
CROP_REDRAWS = 10
# Augmentations drawn again while they move every annotated pixel out of a crop (sparse masks).
AUGMENT_REDRAWS = 3


class NonFiniteRecordError(ValueError):
    """A record whose normalised pixels are NaN or Inf; the message names the database and record."""


class ImageReaderError(RuntimeError):
    """A reader worker failed or died; ``worker_traceback`` holds its traceback text when it sent one."""

    def __init__(self, message, worker_traceback=None):
        super().__init__(message)
        self.worker_traceback = worker_traceback


@dataclass(frozen=True)
class RingLayout:
    """Where everything lives in the shared-memory segment; one object used by parent and workers.

    The segment is a control block (byte 0: the stop flag) followed by ``num_workers *
    slots_per_worker`` slots; worker w owns slots [w * slots_per_worker, (w + 1) * slots_per_worker).
    A slot holds one batch: images float32 [B, H, W, C], then masks int32 [B, H, W].
    """
    batch_size: int
    height: int
    width: int
    channels: int
    num_workers: int
    slots_per_worker: int

    @property
    def image_shape(self):
        return (self.batch_size, self.height, self.width, self.channels)

    @property
    def mask_shape(self):
        return (self.batch_size, self.height, self.width)

    @property
    def image_bytes(self):
        return int(np.prod(self.image_shape)) * 4

    @property
    def slot_bytes(self):
        return self.image_bytes + int(np.prod(self.mask_shape)) * 4

    @property
    def capacity(self):
        return self.num_workers * self.slots_per_worker

    @property
    def segment_bytes(self):
        return _CONTROL_BYTES + self.capacity * self.slot_bytes

    def worker_slots(self, worker_id):
        return list(range(worker_id * self.slots_per_worker, (worker_id + 1) * self.slots_per_worker))

    def stop_flag(self, buffer):
        return np.ndarray((1,), dtype=np.uint8, buffer=buffer)

    def views(self, buffer, slot):
        """(images, masks) numpy views on ``slot`` of the segment ``buffer``."""
        offset = _CONTROL_BYTES + slot * self.slot_bytes
        return (np.ndarray(self.image_shape, dtype=np.float32, buffer=buffer, offset=offset),
                np.ndarray(self.mask_shape, dtype=np.int32, buffer=buffer, offset=offset + self.image_bytes))


@dataclass
class _WorkerSpec:
    """Everything one worker needs; pickled once when the worker is spawned."""
    img_db: str
    worker_id: int
    parent_pid: int
    shm_name: str
    layout: RingLayout
    seed: int
    shard_index: int
    augmentation: augment.AugmentationConfig  # None: no augmentation
    train_records: list = field(default_factory=list)
    class_records: list = None  # balance_classes: per class id, the records holding it
    foreground_crop_fraction: float = 0.0
    foreground_classes: list = None  # per record, the foreground class ids it holds
    use_masks: bool = True  # False: the records' masks are replaced by all-zero ones
    unannotated_crops: int = 0  # training crops taken without an annotated pixel (this worker)


class ImageReader:
    """Training batches of (images, masks) from an LMDB database, produced by ``num_workers`` processes:
    endless random crops of records drawn at random. (The test pass reads whole images itself: see
    evaluation.py.)

    Args:
      img_db: path of a database written by build_lmdb.py.
      batch_size: images per batch.
      use_augmentation: augment the crops.
      balance_classes: draw a class uniformly, then a record holding it (from the
        metadata's class_presence), so every class is equally represented among the records drawn.
      num_workers: reader processes.
      tile_size: side T of the square crops / tiles delivered; None = the records' own size (then
        all records must share it).
      augmentation: augment.AugmentationConfig, or None for its defaults.
      seed: worker w of shard s draws from numpy default_rng([seed, s, w]).
      queue_size: batches buffered in total (default 4 per worker; at least 2 per worker).
      shard_index, shard_count: this process's part when several training processes share the
        database: its own random streams.
      foreground_crop_fraction: this share P of the crops is placed on a pixel of a
        foreground class (centred on it, jittered by up to a quarter tile, clipped to the record),
        the class drawn uniformly from the foreground classes the record holds, or, with
        balance_classes, the class that drew the record when it is a foreground class. Records
        without foreground get a random crop. The pixel is inside the crop before augmentation.
        With sparse masks it is an annotated pixel (unlabelled ones hold records.IGNORE_LABEL),
        and a crop holding no annotated pixel is redrawn (up to CROP_REDRAWS times, then centred
        on an annotated pixel), its augmentation too (up to AUGMENT_REDRAWS times).
      use_masks: False (pretraining, which needs no labels): every record's mask is read as all
        zeros, so a labelled or sparse database trains like an unlabelled one, and -1 marks only
        the pixels that augmentation brought in from outside the image.
    """

    def __init__(self, img_db, batch_size, use_augmentation=True, balance_classes=False,
                 num_workers=1, tile_size=None, augmentation=None, seed=0, queue_size=None,
                 shard_index=0, shard_count=1, foreground_crop_fraction=0.0, use_masks=True):
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 1),
                                     ("shard_count", shard_count, 1)):
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
        if queue_size is not None and (not isinstance(queue_size, (int, np.integer)) or queue_size < 1):
            raise ValueError(f"queue_size must be a positive integer or None, got {queue_size!r}")
        if not 0.0 <= foreground_crop_fraction <= 1.0:  # also false for NaN
            raise ValueError(f"foreground_crop_fraction must be in [0, 1], got {foreground_crop_fraction!r}")
        self.img_db = str(img_db)
        self.batch_size = int(batch_size)
        self.use_augmentation = bool(use_augmentation)
        self.balance_classes = bool(balance_classes)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.foreground_crop_fraction = float(foreground_crop_fraction)
        self.use_masks = bool(use_masks)
        self.augmentation = augmentation if augmentation is not None else augment.AugmentationConfig()
        self.augmentation.validate()

        self._metadata = records.read_metadata(self.img_db)
        num_records = int(self._metadata["num_records"])
        if num_records == 0:
            raise ValueError(f"{self.img_db}: the database holds no records")
        channels = int(self._metadata["channels"])
        shapes = _record_shapes(self.img_db, self._metadata)
        tile = _resolve_tile(self.img_db, shapes, tile_size)
        per_worker = max(2, math.ceil((queue_size or 4 * self.num_workers) / self.num_workers))
        self._layout = RingLayout(self.batch_size, tile[0], tile[1], channels, self.num_workers, per_worker)

        self._starvation_seconds = 0.0
        self._starving = False
        self._next_batch = 0  # batches delivered since startup: picks the worker
        self._last_liveness_check = 0.0
        self._started = False
        self._shm = None
        self._processes = []
        self._ready = []
        self._free = []
        self._errors = None
        self._stop = None  # the stop flag: a one-byte view on the segment's control block
        self._views = []

    # ------------------------------------------------------------------ public API

    def get_queue_size(self):
        """Batches ready and waiting for get_batch."""
        if not self._started:
            return 0
        return sum(q.qsize() for q in self._ready)

    @property
    def starvation_seconds(self):
        """Total time get_batch has spent waiting for a batch."""
        return self._starvation_seconds

    @property
    def worker_pids(self):
        """Process ids of the running workers (empty when stopped); benchmarks sum their CPU time."""
        return [p.pid for p in self._processes]

    def startup(self):
        """Create the shared-memory ring and start the workers (no-op when already running)."""
        if self._started:
            return
        self._started = True
        self._next_batch = 0
        self._starving = False
        self._last_liveness_check = time.monotonic()
        atexit.register(self.shutdown)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self):
        """Stop and join every worker and free the shared memory; safe to call any number of times."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.shutdown)
        if self._stop is not None:
            self._stop[0] = 1
        started = [p for p in self._processes if p.pid is not None]  # startup may have failed midway
        deadline = time.monotonic() + _SHUTDOWN_SECONDS
        for p in started:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        # Last resort for a worker stuck in C code: SIGKILL (workers ignore SIGTERM, see _worker_main).
        for p in started:
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for q in self._ready + self._free + ([self._errors] if self._errors is not None else []):
            # Nobody reads these pipes any more: never let a feeder thread block the parent's exit.
            q.close()
            q.cancel_join_thread()
        self._processes, self._ready, self._free, self._errors, self._stop = [], [], [], None, None
        self._views = []
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    def __enter__(self):
        self.startup()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.shutdown()
        return False

    def get_batch(self, timeout=None):
        """The next batch: (images float32 [B, T, T, C], masks int32 [B, T, T]).

        Raises ImageReaderError when a worker failed or died, TimeoutError after ``timeout`` seconds.
        """
        if not self._started:
            raise RuntimeError("ImageReader.get_batch called before startup() (or after shutdown())")
        worker = self._next_batch % self.num_workers
        self._report_starvation()
        slot = self._wait_for_slot(worker, timeout)
        images, masks = (view.copy() for view in self._views[slot])
        self._free[worker].put(slot)
        self._next_batch += 1
        return images, masks

    # ------------------------------------------------------------------ internals

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        layout = self._layout
        _check_shared_memory_room(layout)
        name = f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=layout.segment_bytes)
        self._stop = layout.stop_flag(self._shm.buf)
        self._views = [layout.views(self._shm.buf, slot) for slot in range(layout.capacity)]
        self._errors = ctx.Queue()
        presence = self._metadata.get("class_presence") or []
        for worker_id in range(self.num_workers):
            spec = _WorkerSpec(
                img_db=os.path.abspath(self.img_db), worker_id=worker_id, parent_pid=os.getpid(),
                shm_name=name, layout=layout, seed=self.seed, shard_index=self.shard_index,
                augmentation=self.augmentation if self.use_augmentation else None,
                train_records=list(range(int(self._metadata["num_records"]))),
                class_records=_records_per_class(self._metadata) if self.balance_classes else None,
                foreground_crop_fraction=self.foreground_crop_fraction,
                foreground_classes=[[int(c) for c in classes if int(c) != 0] for classes in presence]
                if self.foreground_crop_fraction > 0 else None, use_masks=self.use_masks)
            free, ready = ctx.Queue(), ctx.Queue()
            for slot in layout.worker_slots(worker_id):
                free.put(slot)
            self._free.append(free)
            self._ready.append(ready)
            # daemon: multiprocessing's own exit handler terminates them should everything else fail.
            self._processes.append(ctx.Process(target=_worker_main, name=f"ImageReader-{worker_id}",
                                               args=(spec, free, ready, self._errors), daemon=True))
        with _main_module_hidden(), _worker_malloc_settings(), _group_signals_blocked():
            for p in self._processes:
                p.start()

    def _report_starvation(self):
        depth = self.get_queue_size()
        if not self._starving and depth < 0.1 * self._layout.capacity:
            self._starving = True
            print(STARVATION_MESSAGE, flush=True)
        elif self._starving and depth > 0.5 * self._layout.capacity:
            self._starving = False
            print(STARVATION_OVER_MESSAGE, flush=True)

    def _wait_for_slot(self, worker, timeout):
        start = time.monotonic()
        ready = self._ready[worker]
        try:
            while True:
                now = time.monotonic()
                if now - self._last_liveness_check > _LIVENESS_SECONDS:
                    self._check_workers()
                    self._last_liveness_check = now
                wait = _POLL_SECONDS
                if timeout is not None:
                    remaining = timeout - (now - start)
                    if remaining <= 0:
                        raise TimeoutError(f"no batch from the reader workers of {self.img_db} "
                                           f"within {timeout} s")
                    wait = min(wait, remaining)
                try:
                    return ready.get(timeout=wait)
                except queue.Empty:
                    self._check_workers()
                    self._last_liveness_check = time.monotonic()
        finally:
            self._starvation_seconds += time.monotonic() - start

    def _check_workers(self):
        """Raise ImageReaderError (after shutting down) if a worker reported an error or died."""
        failure = self._worker_error(wait=0.0)
        if failure is None:
            for worker_id, p in enumerate(self._processes):
                if p.exitcode is not None:
                    # A worker that raised exits right after queueing its traceback: give it a moment.
                    failure = self._worker_error(wait=1.0) or (worker_id, None, p.pid, p.exitcode)
                    break
        if failure is None:
            return
        worker_id, tb, pid, exitcode = failure
        self.shutdown()
        if tb is not None:
            # The exception's own line first: it names the database and record at fault.
            summary = tb.strip().splitlines()[-1]
            raise ImageReaderError(f"ImageReader worker {worker_id} (pid {pid}) reading {self.img_db} "
                                   f"failed: {summary}\n{tb}", worker_traceback=tb)
        how = f"exit code {exitcode}"
        if exitcode < 0:
            how = f"signal {signal.Signals(-exitcode).name}"
        raise ImageReaderError(f"ImageReader worker {worker_id} (pid {pid}) reading {self.img_db} "
                               f"died unexpectedly ({how})")

    def _worker_error(self, wait):
        try:
            worker_id, tb = self._errors.get(timeout=wait) if wait else self._errors.get_nowait()
        except queue.Empty:
            return None
        p = self._processes[worker_id]
        return worker_id, tb, p.pid, p.exitcode


# ---------------------------------------------------------------------- planning (parent side)

def _record_shapes(img_db, metadata):
    """(H, W) of every record, from the metadata when they all share one shape, else from the records."""
    if metadata.get("image_shape") is not None:
        h, w = metadata["image_shape"][:2]
        return [(h, w)] * int(metadata["num_records"])
    # Only headers are parsed: with buffers=True decode_record builds views, it copies no pixels.
    env = records.open_database(img_db)
    try:
        with env.begin(buffers=True) as txn:
            shapes = []
            for i in range(int(metadata["num_records"])):
                buffer = txn.get(records.record_key(i))
                if buffer is None:
                    raise records.RecordFormatError(f"{img_db}: record {i} is missing")
                shapes.append(records.decode_record(buffer)[1].shape)
    finally:
        env.close()
    return shapes


def _resolve_tile(img_db, shapes, tile_size):
    if tile_size is None:
        distinct = sorted(set(shapes))
        if len(distinct) > 1:
            raise ValueError(f"{img_db}: records have different sizes {distinct[:5]}: pass tile_size")
        return tuple(distinct[0])
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer or None, got {tile_size!r}")
    for i, (h, w) in enumerate(shapes):
        if h < tile_size or w < tile_size:
            raise ValueError(f"{img_db}: record {i} is {h}x{w}, smaller than tile_size {tile_size}")
    return (int(tile_size), int(tile_size))


def _records_per_class(metadata):
    """[(class id, records holding it)] for every class present, from the metadata's class_presence."""
    presence = metadata.get("class_presence")
    if not presence:
        raise ValueError("balance_classes needs the metadata's class_presence; rebuild the database")
    by_class = {}
    for record, classes in enumerate(presence):
        for c in classes:
            by_class.setdefault(int(c), []).append(record)
    return [(c, by_class[c]) for c in sorted(by_class)]


@contextlib.contextmanager
def _main_module_hidden():
    """Hide the parent's __main__ while spawning, so workers do not re-run the training script's imports.

    A spawned child re-imports the parent's main script (e.g. train_unet.py with TensorFlow: seconds
    and hundreds of MB per worker); the workers need only this module, which the pickled target names.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


# Signals sent to the whole process group (Ctrl-C, Slurm) that workers leave to the parent.
_PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _group_signals_blocked():
    """Block SIGINT/SIGTERM in this thread while workers are spawned; the children inherit the mask.

    A worker needs a moment (interpreter start, imports) before _worker_main ignores them; a group
    signal in that window would kill it. Blocked, the signal stays pending until the worker has
    set SIG_IGN and unblocks, and is then discarded. The parent gets its own copy as usual once
    the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _worker_malloc_settings():
    """Start workers with glibc malloc keeping large blocks on the heap instead of mmap/munmap.

    Each augmentation allocates and frees several image-sized (256-512 KB) temporaries. With glibc's
    defaults a fresh process returns them to the kernel and faults them back in on every image:
    measured 3.2 CPU ms per 256x256 image in a spawned worker vs 2.6 ms with these settings (which
    also beat the long-running parent, whose thresholds had already adapted). The variables are
    read by a process at start-up, so they are set only while the workers are spawned; values the
    user set are kept.
    """
    settings = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
    added = [name for name in settings if name not in os.environ]
    os.environ.update({name: settings[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


# ---------------------------------------------------------------------- worker side

def _worker_main(spec, free, ready, errors):
    # Ctrl-C in a terminal and Slurm's SIGTERM (scancel, time limit) reach the whole process group:
    # the parent decides when workers stop, so it can finish its checkpoint with batches still flowing
    # and then shut them down itself. An orphaned worker still notices its parent is gone.
    for signum in _PARENT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)  # blocked by the parent while spawning
    shm = None
    try:
        shm = _attach_shared_memory(spec.shm_name)
        env = records.open_database(spec.img_db)
        try:
            _produce(spec, shm, env, free, ready)
        finally:
            env.close()
    except BaseException:
        errors.put((spec.worker_id, traceback.format_exc()))
    finally:
        if shm is not None:
            shm.close()


def _produce(spec, shm, env, free, ready):
    """Fill free slots with batches until stopped or orphaned (the views on shm die with this frame)."""
    layout = spec.layout
    stop = layout.stop_flag(shm.buf)
    rng = np.random.default_rng([spec.seed, spec.shard_index, spec.worker_id])
    with env.begin(buffers=True) as txn:
        for items in _train_batches(spec, rng):
            slot = _next_free_slot(free, stop, spec.parent_pid)
            if slot is None:
                return
            images, masks = layout.views(shm.buf, slot)
            for i, item in enumerate(items):
                images[i], masks[i] = _read_item(txn, spec, item, rng)
            del images, masks
            ready.put(slot)


def _attach_shared_memory(name):
    """Attach to the parent's segment without registering it with the resource tracker.

    Spawned workers share the parent's resource tracker. Only the parent's registration may exist:
    it unregisters when it unlinks, and if the parent is killed the tracker unlinks the segment once
    the parent and the workers have all gone. (Python 3.13 has track=False for this.)
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None if rtype == "shared_memory" else register(name, rtype)
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _check_shared_memory_room(layout):
    """ImageReaderError when SHM_DIR (where Linux keeps POSIX shared memory) has less room than the
    ring needs. The segment is only reserved when created: a worker writing past the room would die
    of SIGBUS, a message that names neither the cause nor the fix (Docker gives 64 MB by default)."""
    try:
        free = shutil.disk_usage(SHM_DIR).free
    except OSError:  # no such folder (not Linux): nothing to check
        return
    if free < layout.segment_bytes:
        raise ImageReaderError(
            f"{SHM_DIR} has {free / 2 ** 20:.1f} MiB free; the readers' shared batch buffer needs "
            f"{layout.segment_bytes / 2 ** 20:.1f} MiB ({layout.capacity} batches of {layout.batch_size} x "
            f"{layout.height} x {layout.width} px x {layout.channels} channel(s)). Give {SHM_DIR} more room "
            "(docker run --shm-size=2g, or ask the cluster's admins), or lower --reader_count, --batch_size "
            "or --tile_size")


def _parent_wants_us(stop, parent_pid):
    # A parent killed by SIGTERM/SIGKILL never sets stop; orphaned workers get a new parent pid.
    return stop[0] == 0 and os.getppid() == parent_pid


def _next_free_slot(free, stop, parent_pid):
    while _parent_wants_us(stop, parent_pid):
        try:
            return free.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
    return None


def _train_batches(spec, rng):
    """Endless lists of (record, class): a random crop of the record, placed by _read_item; class is
    the class id balance_classes drew the record for (else None)."""
    if spec.class_records is not None:
        def draw():
            label, members = spec.class_records[rng.integers(len(spec.class_records))]
            return members[rng.integers(len(members))], label
    else:
        order = []

        def draw():
            if not order:
                order.extend(rng.permutation(spec.train_records).tolist())
            return order.pop(), None
    while True:
        yield [draw() for _ in range(spec.layout.batch_size)]


def _annotated_crop_origin(spec, record, label, mask, rng):
    """_crop_origin, redrawn up to CROP_REDRAWS times while the crop holds no annotated pixel, then
    centred on a random annotated pixel.

    A crop of unlabelled pixels only (sparse masks) adds nothing to the loss. Uniform redraws keep
    the crops spread over the record, but rarely hit a small annotation in a large record (a 12 x 6
    px stroke in 256 px records missed 11 draws of 64 px crops one time in three), hence the
    centring. A record without any annotated pixel (a tile of a sparse mask) gets its last draw,
    counted in a warning.
    """
    y0, x0 = _crop_origin(spec, record, label, mask, rng)
    if mask.dtype.kind == "u":  # unsigned masks cannot hold records.IGNORE_LABEL: dense
        return y0, x0
    h, w = spec.layout.height, spec.layout.width
    for _ in range(CROP_REDRAWS):
        if (mask[y0:y0 + h, x0:x0 + w] >= 0).any():
            return y0, x0
        y0, x0 = _crop_origin(spec, record, label, mask, rng)
    if (mask[y0:y0 + h, x0:x0 + w] >= 0).any():
        return y0, x0
    annotated = np.flatnonzero(mask >= 0)
    if annotated.size:
        return _centred_origin(spec, mask.shape, int(annotated[rng.integers(annotated.size)]), rng)
    _warn_unannotated(spec, record, "the record holds no annotated pixel; records of tiles of sparse "
                      "masks do this: build without --tile_size, or annotate every tile")
    return y0, x0


def _warn_unannotated(spec, record, why):
    """Count a training crop without annotated pixels; warn at the 1st, 10th, 100th, ... one."""
    spec.unannotated_crops += 1
    if math.log10(spec.unannotated_crops).is_integer():
        print(f"warning: {spec.img_db}: {spec.unannotated_crops} training crop(s) of reader worker "
              f"{spec.worker_id} held no annotated pixel and add nothing to the loss (latest: record "
              f"{record}: {why})", file=sys.stderr, flush=True)


def _centred_origin(spec, shape, pixel, rng):
    """(y0, x0) of a crop centred on the flat index ``pixel`` of a record of ``shape``, jittered by up
    to a quarter tile (so the pixel stays well inside and a rotation about the crop centre keeps
    it), then clipped to the record."""
    h, w = spec.layout.height, spec.layout.width
    height, width = shape
    y, x = divmod(pixel, width)
    jy, jx = rng.integers(-(h // 4), h // 4 + 1), rng.integers(-(w // 4), w // 4 + 1)
    return int(np.clip(y - h // 2 + jy, 0, height - h)), int(np.clip(x - w // 2 + jx, 0, width - w))


def _crop_origin(spec, record, label, mask, rng):
    """(y0, x0) of a training crop: on a foreground pixel for a foreground_crop_fraction share,
    else uniform over the record."""
    h, w = spec.layout.height, spec.layout.width
    height, width = mask.shape
    if spec.foreground_crop_fraction > 0 and rng.random() < spec.foreground_crop_fraction:
        classes = spec.foreground_classes[record] if spec.foreground_classes else []
        if label not in classes:
            label = int(classes[rng.integers(len(classes))]) if classes else None
        if label is not None:
            pixels = np.flatnonzero(mask == label)
            if pixels.size:
                return _centred_origin(spec, mask.shape, int(pixels[rng.integers(pixels.size)]), rng)
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))


def _cut(image, mask, origin, spec, offset=None):
    """The training crop at ``origin`` of a record's image (minus ``offset``, per channel) and mask."""
    (y0, x0), h, w = origin, spec.layout.height, spec.layout.width
    image = image[y0:y0 + h, x0:x0 + w]
    if offset is not None:
        image = image.astype(np.int64) - offset.astype(np.int64)
    elif not image.flags.aligned:
        # LMDB values start at any byte offset; numpy and scipy are slower on unaligned data, and
        # copying one crop costs far less than the augmentation (measured ~7% faster overall).
        image = image.copy()
    return image, mask[y0:y0 + h, x0:x0 + w]


def _augmented_crop(spec, record, image, mask, origin, rng, offset=None):
    """augment.augment_image of the crop at ``origin``. Zoom, rotation and elastic shifts can move a
    small stroke out of a crop that held it (about 1 crop in 10 of small strokes did): that crop is
    drawn again, centred on an annotated pixel (which rotation keeps inside), up to AUGMENT_REDRAWS
    times; the last draw is then taken and counted. ``offset`` (normalization.integer_offset) is
    subtracted from every crop first."""
    crop, crop_mask = _cut(image, mask, origin, spec, offset)
    if crop_mask.dtype.kind == "u" or not (crop_mask >= 0).any():  # dense, or nothing to keep
        return augment.augment_image(crop, spec.augmentation, crop_mask, rng)
    annotated = None  # the record's annotated pixels, listed only when a draw has lost them
    for _ in range(AUGMENT_REDRAWS):
        augmented, augmented_mask = augment.augment_image(crop, spec.augmentation, crop_mask, rng)
        if (augmented_mask >= 0).any():
            return augmented, augmented_mask
        annotated = np.flatnonzero(mask >= 0) if annotated is None else annotated
        origin = _centred_origin(spec, mask.shape, int(annotated[rng.integers(annotated.size)]), rng)
        crop, crop_mask = _cut(image, mask, origin, spec, offset)
    augmented, augmented_mask = augment.augment_image(crop, spec.augmentation, crop_mask, rng)
    if not (augmented_mask >= 0).any():
        _warn_unannotated(spec, record, f"augmentation moved its annotated pixels out of the crop "
                          f"{AUGMENT_REDRAWS + 1} times; longer strokes or a larger training "
                          "--tile_size avoid it")
    return augmented, augmented_mask


def _read_item(txn, spec, item, rng):
    """One (image float32 T x T x C, mask T x T) from a record: crop, augment, normalise."""
    record, label = item
    buffer = txn.get(records.record_key(record))
    if buffer is None:
        raise records.RecordFormatError(f"{spec.img_db}: record {record} is missing")
    try:
        image, mask, statistics = records.decode(buffer)
    except records.RecordFormatError as exc:
        raise records.RecordFormatError(f"{spec.img_db}: record {record}: {exc}") from None
    if not spec.use_masks:
        mask = np.zeros(mask.shape, np.uint8)
    origin = _annotated_crop_origin(spec, record, label, mask, rng)
    stored, offset = image.dtype, None
    if spec.augmentation is not None:
        # On the raw values: intensity and noise augmentation then change what the network sees
        # (a per-crop z-score afterwards would cancel an intensity shift entirely).
        offset = normalization.integer_offset(stored, statistics)
        image, mask = _augmented_crop(spec, record, image, mask, origin, rng, offset)
    else:
        image, mask = _cut(image, mask, origin, spec)
    image = normalization.normalize(image, statistics, offset=offset, dtype=stored)
    if not np.isfinite(image).all():
        raise NonFiniteRecordError(
            f"{spec.img_db}: record {record} holds non-finite values (NaN or Inf) in its pixels or "
            "its normalisation statistics; training cannot use it. Rebuild the database with "
            "build_lmdb.py, which refuses such images and names the file")
    return image, mask
