"""Multiprocess batch reader: worker processes read an LMDB database, augment and batch its records.

Each worker is its own process (started with the "spawn" method, so no LMDB environment, TensorFlow
state or lock ever crosses a fork). A worker opens the database itself, then loops: take a free
slot of a shared-memory ring, read and decode records, crop or tile them, augment (training only),
z-score normalise, write a whole batch into the slot and put the slot's index on its ready queue.
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
import records

# /dev/shm segments are named SHM_PREFIX + "<parent pid>_<random>", so leaks are easy to spot.
SHM_PREFIX = "segreader_"
STARVATION_MESSAGE = "Input Queue Starvation !!!!"
STARVATION_OVER_MESSAGE = "Input Queue Starvation Over"

_POLL_SECONDS = 0.2  # how often blocked workers and the waiting parent look for stop / death
_LIVENESS_SECONDS = 0.5  # how often the parent checks the workers while batches keep flowing
_SHUTDOWN_SECONDS = 5.0  # budget for workers to stop by themselves before they are terminated
# The segment starts with a control block whose first byte is the stop flag, then the slots. A
# plain byte rather than a multiprocessing.Event: an Event takes a lock shared by every process, and
# a worker killed while holding it would hang the others and the parent's shutdown.
_CONTROL_BYTES = 64


class ImageReaderError(RuntimeError):
    """A reader worker failed or died; ``worker_traceback`` holds its traceback text when it sent one."""

    def __init__(self, message, worker_traceback=None):
        super().__init__(message)
        self.worker_traceback = worker_traceback


@dataclass
class _WorkerSpec:
    """Everything one worker needs; pickled once when the worker is spawned."""
    img_db: str
    worker_id: int
    parent_pid: int
    shm_name: str
    slots: list  # slot indices of the ring owned by this worker
    batch_size: int
    tile: tuple  # (height, width)
    channels: int
    train: bool
    seed: int
    shard_index: int
    use_augmentation: bool
    augment_kwargs: dict
    train_records: list = field(default_factory=list)
    class_records: list = None  # balance_classes: per class, the records holding it
    test_batches: list = field(default_factory=list)  # per batch: [(record, y0, x0, own_y, own_x)]


class ImageReader:
    """Batches of (images, masks) from an LMDB database, produced by ``num_workers`` processes.

    Args:
      img_db: path of a database written by build_lmdb.py.
      batch_size: images per batch.
      use_augmentation: augment training batches (never applied in test mode: test metrics must be
        exact and the masks must match the tiling).
      balance_classes: training mode: draw a class uniformly, then a record holding it (from the
        metadata's class_presence), so every class is equally represented.
      shuffle: True = training mode (endless random crops); False = test mode (every record, or
        every tile of records larger than tile_size, exactly once per pass, in a fixed order).
      num_workers: reader processes.
      tile_size: side T of the square tiles delivered; None = the records' own size (then all
        records must share it).
      augmentation: augment.AugmentationConfig, or None for its defaults.
      seed: training mode: worker w of shard s draws from numpy default_rng([seed, s, w]).
      queue_size: batches buffered in total (default 4 per worker; at least 2 per worker).
      shard_index, shard_count: this process's part when several training processes share the
        database: its own random streams in training mode, a disjoint part of the records in test mode.
    """

    def __init__(self, img_db, batch_size, use_augmentation=True, balance_classes=False, shuffle=True,
                 num_workers=1, tile_size=None, augmentation=None, seed=0, queue_size=None,
                 shard_index=0, shard_count=1):
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 1),
                                     ("shard_count", shard_count, 1)):
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
        if queue_size is not None and (not isinstance(queue_size, (int, np.integer)) or queue_size < 1):
            raise ValueError(f"queue_size must be a positive integer or None, got {queue_size!r}")
        self.img_db = str(img_db)
        self.batch_size = int(batch_size)
        self.use_augmentation = bool(use_augmentation)
        self.balance_classes = bool(balance_classes)
        self.shuffle = bool(shuffle)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.augmentation = augmentation if augmentation is not None else augment.AugmentationConfig()
        self.augmentation.validate()

        self._metadata = records.read_metadata(self.img_db)
        num_records = int(self._metadata["num_records"])
        if num_records == 0:
            raise ValueError(f"{self.img_db}: the database holds no records")
        self._channels = int(self._metadata["channels"])
        shapes = _record_shapes(self.img_db, self._metadata)
        self._tile = _resolve_tile(self.img_db, shapes, tile_size)

        self._shard_records = list(range(self.shard_index, num_records, self.shard_count))
        self._class_records = _records_per_class(self._metadata) if self.balance_classes else None
        if self.shuffle:
            self._test_batches = []
        else:
            items = [item for r in self._shard_records for item in _tiles(r, shapes[r], self._tile)]
            self._test_batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

        per_worker = max(2, math.ceil((queue_size or 4 * self.num_workers) / self.num_workers))
        self._slots_per_worker = per_worker
        self._capacity = per_worker * self.num_workers
        h, w = self._tile
        self._image_shape = (self.batch_size, h, w, self._channels)
        self._mask_shape = (self.batch_size, h, w)
        self._image_bytes = int(np.prod(self._image_shape)) * 4
        self._slot_bytes = self._image_bytes + int(np.prod(self._mask_shape)) * 4

        self._starvation_seconds = 0.0
        self._starving = False
        self._next_batch = 0  # batches delivered since startup: picks the worker in training mode
        self._pass_position = 0  # batches delivered in the current test pass
        self._last_liveness_check = 0.0
        self._started = False
        self._shm = None
        self._processes = []
        self._ready = []
        self._free = []
        self._errors = None
        self._stop = None  # the stop flag: a one-byte view on the segment's control block
        self._image_views = []
        self._mask_views = []

    # ------------------------------------------------------------------ public API

    def get_epoch_size(self):
        """Number of records this shard sees (per epoch in training, per pass in test mode)."""
        return len(self._shard_records)

    def get_test_batch_count(self):
        """Batches in one test pass (the last one padded with mask -1)."""
        return len(self._test_batches)

    def get_image_size(self):
        """(T, T, C) of the images delivered."""
        return (self._tile[0], self._tile[1], self._channels)

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
        """Process ids of the running workers (empty when stopped)."""
        return [p.pid for p in self._processes]

    def startup(self):
        """Create the shared-memory ring and start the workers (no-op when already running)."""
        if self._started:
            return
        self._started = True
        self._next_batch = 0
        self._pass_position = 0
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
        # Last resorts for a worker stuck in C code: SIGTERM, then SIGKILL.
        for stopper in ("terminate", "kill"):
            for p in started:
                if p.is_alive():
                    getattr(p, stopper)()
                    p.join(timeout=2.0)
        for q in self._ready + self._free + ([self._errors] if self._errors is not None else []):
            # Nobody reads these pipes any more: never let a feeder thread block the parent's exit.
            q.close()
            q.cancel_join_thread()
        self._processes, self._ready, self._free, self._errors, self._stop = [], [], [], None, None
        self._image_views, self._mask_views = [], []
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

        In test mode returns None once the pass is complete; the next call starts the next pass.
        Raises ImageReaderError when a worker failed or died, TimeoutError after ``timeout`` seconds.
        """
        if not self._started:
            raise RuntimeError("ImageReader.get_batch called before startup() (or after shutdown())")
        if not self.shuffle:
            if self._pass_position == len(self._test_batches):
                self._pass_position = 0
                return None
            worker = self._pass_position % self.num_workers
        else:
            worker = self._next_batch % self.num_workers
        self._report_starvation()
        slot = self._wait_for_slot(worker, timeout)
        images = self._image_views[slot].copy()
        masks = self._mask_views[slot].copy()
        self._free[worker].put(slot)
        self._next_batch += 1
        if not self.shuffle:
            self._pass_position += 1
        return images, masks

    def generator(self):
        """Training mode: an endless stream of batches. Test mode: the batches of one pass."""
        while True:
            batch = self.get_batch()
            if batch is None:
                return
            yield batch

    # ------------------------------------------------------------------ internals

    def _start(self):
        ctx = multiprocessing.get_context("spawn")
        name = f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self._shm = shared_memory.SharedMemory(name=name, create=True,
                                               size=_CONTROL_BYTES + self._capacity * self._slot_bytes)
        self._stop = np.ndarray((1,), dtype=np.uint8, buffer=self._shm.buf)
        for slot in range(self._capacity):
            image_view, mask_view = _slot_views(self._shm.buf, slot, self._slot_bytes, self._image_bytes,
                                                self._image_shape, self._mask_shape)
            self._image_views.append(image_view)
            self._mask_views.append(mask_view)
        self._errors = ctx.Queue()
        augment_kwargs = self.augmentation.augment_kwargs() if self.use_augmentation else {}
        for worker_id in range(self.num_workers):
            slots = list(range(worker_id * self._slots_per_worker, (worker_id + 1) * self._slots_per_worker))
            spec = _WorkerSpec(
                img_db=os.path.abspath(self.img_db), worker_id=worker_id, parent_pid=os.getpid(),
                shm_name=name, slots=slots, batch_size=self.batch_size, tile=self._tile,
                channels=self._channels, train=self.shuffle, seed=self.seed, shard_index=self.shard_index,
                use_augmentation=self.use_augmentation and self.shuffle, augment_kwargs=augment_kwargs,
                train_records=list(range(int(self._metadata["num_records"]))) if self.shuffle else [],
                class_records=self._class_records if self.shuffle else None,
                test_batches=self._test_batches[worker_id::self.num_workers])
            free, ready = ctx.Queue(), ctx.Queue()
            for slot in slots:
                free.put(slot)
            self._free.append(free)
            self._ready.append(ready)
            # daemon: multiprocessing's own exit handler terminates them should everything else fail.
            self._processes.append(ctx.Process(target=_worker_main, name=f"ImageReader-{worker_id}",
                                               args=(spec, free, ready, self._errors), daemon=True))
        with _main_module_hidden(), _worker_malloc_settings():
            for p in self._processes:
                p.start()

    def _report_starvation(self):
        depth = self.get_queue_size()
        if not self._starving and depth < 0.1 * self._capacity:
            self._starving = True
            print(STARVATION_MESSAGE, flush=True)
        elif self._starving and depth > 0.5 * self._capacity:
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
            raise ImageReaderError(f"ImageReader worker {worker_id} (pid {pid}) reading {self.img_db} "
                                   f"failed:\n{tb}", worker_traceback=tb)
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


def _axis_tiles(length, tile):
    """[(start, first owned offset)] along one axis: regular tiles, the last one shifted inward.

    The shifted last tile overlaps its neighbour; the overlap belongs to the neighbour, so the first
    owned offset says where this tile's own pixels begin.
    """
    starts = list(range(0, length - tile + 1, tile))
    tiles = [(s, 0) for s in starts]
    if starts[-1] + tile < length:
        tiles.append((length - tile, starts[-1] + tile - (length - tile)))
    return tiles


def _tiles(record, shape, tile):
    return [(record, y0, x0, own_y, own_x)
            for y0, own_y in _axis_tiles(shape[0], tile[0]) for x0, own_x in _axis_tiles(shape[1], tile[1])]


def _records_per_class(metadata):
    presence = metadata.get("class_presence")
    if not presence:
        raise ValueError("balance_classes needs the metadata's class_presence; rebuild the database")
    by_class = {}
    for record, classes in enumerate(presence):
        for c in classes:
            by_class.setdefault(int(c), []).append(record)
    return [by_class[c] for c in sorted(by_class)]


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


def _slot_views(buffer, slot, slot_bytes, image_bytes, image_shape, mask_shape):
    offset = _CONTROL_BYTES + slot * slot_bytes
    return (np.ndarray(image_shape, dtype=np.float32, buffer=buffer, offset=offset),
            np.ndarray(mask_shape, dtype=np.int32, buffer=buffer, offset=offset + image_bytes))


# ---------------------------------------------------------------------- worker side

def _worker_main(spec, free, ready, errors):
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    stop = np.ndarray((1,), dtype=np.uint8, buffer=shm.buf)
    h, w = spec.tile
    image_shape = (spec.batch_size, h, w, spec.channels)
    mask_shape = (spec.batch_size, h, w)
    image_bytes = int(np.prod(image_shape)) * 4
    slot_bytes = image_bytes + int(np.prod(mask_shape)) * 4
    rng = np.random.default_rng([spec.seed, spec.shard_index, spec.worker_id])
    batches = _train_batches(spec, rng) if spec.train else _test_batches(spec)
    with env.begin(buffers=True) as txn:
        for items in batches:
            slot = _next_free_slot(free, stop, spec.parent_pid)
            if slot is None:
                return
            images, masks = _slot_views(shm.buf, slot, slot_bytes, image_bytes, image_shape, mask_shape)
            for i, item in enumerate(items):
                images[i], masks[i] = _read_item(txn, spec, item, rng)
            images[len(items):] = 0
            masks[len(items):] = -1
            del images, masks
            ready.put(slot)
    # Test mode with no batch for this worker (more workers than batches): idle until told.
    while _parent_wants_us(stop, spec.parent_pid):
        time.sleep(_POLL_SECONDS)


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
    """Endless lists of (record, y0, x0, 0, 0); y0, x0 = None means a random crop."""
    if spec.class_records is not None:
        def draw():
            members = spec.class_records[rng.integers(len(spec.class_records))]
            return members[rng.integers(len(members))]
    else:
        order = []

        def draw():
            if not order:
                order.extend(rng.permutation(spec.train_records).tolist())
            return order.pop()
    while True:
        yield [(draw(), None, None, 0, 0) for _ in range(spec.batch_size)]


def _test_batches(spec):
    """The worker's batches of a test pass, pass after pass."""
    while spec.test_batches:
        yield from spec.test_batches


def _read_item(txn, spec, item, rng):
    """One (image float32 T x T x C, mask T x T) from a record: crop, augment, normalise."""
    record, y0, x0, own_y, own_x = item
    buffer = txn.get(records.record_key(record))
    if buffer is None:
        raise records.RecordFormatError(f"{spec.img_db}: record {record} is missing")
    image, mask = records.decode_record(buffer)
    h, w = spec.tile
    if y0 is None:
        y0 = int(rng.integers(0, image.shape[0] - h + 1))
        x0 = int(rng.integers(0, image.shape[1] - w + 1))
    image = image[y0:y0 + h, x0:x0 + w]
    mask = mask[y0:y0 + h, x0:x0 + w]
    if not image.flags.aligned:
        # LMDB values start at any byte offset; numpy and scipy are slower on unaligned data, and
        # copying one crop costs far less than the augmentation (measured ~7% faster overall).
        image = image.copy()
    if spec.use_augmentation:
        image, mask = augment.augment_image(image, mask, **spec.augment_kwargs, rng=rng)
    image = augment.zscore_normalize(image)
    if own_y or own_x:
        mask = mask.astype(np.int32)
        mask[:own_y] = -1
        mask[:, :own_x] = -1
    return image, mask
