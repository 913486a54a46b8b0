"""The engines that run the network for inference: TensorFlow, or ONNX Runtime on an ONNX export.

    forward = engines.make_forward("onnxruntime", loaded)    # loaded: checkpoints.LoadedModel list
    logits = forward(batch)                                  # float32 [B, H, W, C] -> [B, H, W, K]

Both give the same callable as predictor.make_predictor, so tiling, halos, --tta and ensembles are
those of the TensorFlow path (predictor.iter_bands drives either).

The TensorFlow engine can also compute in bfloat16 or float16 (``precision``): a copy of the model
under Keras's mixed policy, the logits still float32. On a CPU with AMX (Intel Xeon 4th generation
and later) bfloat16 runs the default UNet several times faster, at masks that differ from float32's
on a few pixels in ten thousand (docs/inference-at-scale.md); it is never the default, since the
masks are not identical.

The ONNX graph is exported from the Keras model by Keras 3's own exporter
(``model.export(format="onnx")``, which runs tf2onnx) with free batch, height and width, and cached
beside the model as ``<model>.onnx`` (``model.onnx`` in a checkpoint folder): an export takes
seconds for a small UNet but over a minute for the default one (base_filters 64) on a 2-core CPU. The cache records the SHA-256 of the file it was made from and is
remade when that changes; where the model's folder is read-only, the export goes to a temporary
file for this run only.
"""
import contextlib
import os
import pathlib
import tempfile

import keras
import numpy as np

import image_io
import models
import predictor

ENGINES = ("tensorflow", "onnxruntime")
PRECISIONS = tuple(models.PRECISIONS)  # float32 (default), bfloat16, float16
SOURCE_HASH_KEY = "segtool_source_sha256"  # ONNX metadata: the hash of the file exported from


class EngineError(Exception):
    """An engine cannot run here (package missing, export failed); names the engine and the fix."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineError("--engine onnxruntime needs the onnxruntime and tf2onnx packages "
                          "(pip install onnxruntime tf2onnx; both are in requirements.txt)") from exc
    return onnxruntime


def file_sha256(path):
    """SHA-256 of a model file, or of a checkpoint folder's weights file."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "model.weights.h5"
    return image_io.sha256(path)


def onnx_cache_path(source):
    """Where the ONNX export of the model at ``source`` (a .keras file or checkpoint folder) is kept."""
    source = pathlib.Path(source)
    if source.is_dir() or source.name == "model.weights.h5":  # a checkpoint: its folder's model.onnx
        return (source if source.is_dir() else source.parent) / "model.onnx"
    return source.with_suffix(".onnx")


def export_onnx(model, path, source_hash="", shape=None):
    """Write ``model`` as ONNX to ``path`` (atomically); returns ``path``.

    ``shape``: the input shape with None for the free axes; default (None, None, None, C), i.e. free
    batch, height and width of a channels-last network. The exporter needs a model that has been
    called once: a batch of one with 256 for every free axis does it (a multiple of every size
    divisor up to depth-8 networks).
    """
    import onnx  # imported here: the TensorFlow engine runs without the ONNX packages

    shape = tuple(shape or (None, None, None, int(model.input_shape[-1])))
    model(np.zeros([1] + [256 if size is None else size for size in shape[1:]], np.float32),
          training=False)
    with tempfile.TemporaryDirectory() as folder:
        exported = pathlib.Path(folder) / "model.onnx"
        signature = [keras.InputSpec(shape=shape, dtype="float32")]
        try:
            # Quiet the exporter's "Saved artifact at ..." (a temporary path of no use to anyone).
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                model.export(str(exported), format="onnx", input_signature=signature, verbose=False)
        except Exception as exc:
            raise EngineError(f"exporting {model.name} to ONNX failed ({type(exc).__name__}: {exc}); "
                              f"use --engine tensorflow") from exc
        graph = onnx.load(str(exported))
    entry = graph.metadata_props.add()
    entry.key, entry.value = SOURCE_HASH_KEY, source_hash
    image_io.atomic_write(path, lambda f: f.write(graph.SerializeToString()))
    return pathlib.Path(path)


def cached_onnx(loaded):
    """Path of an up-to-date ONNX export of ``loaded`` (a checkpoints.LoadedModel), exporting it when
    the cache beside the model is missing or was made from another file. Returns (path, note)."""
    ort = _import_onnxruntime()
    source_hash = file_sha256(loaded.source)
    path = onnx_cache_path(loaded.source)
    if path.is_file():
        with contextlib.suppress(Exception):  # unreadable or foreign: exported anew below
            meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
            if meta.custom_metadata_map.get(SOURCE_HASH_KEY) == source_hash:
                return path, f"cached {path}"
    try:
        return export_onnx(loaded.model, path, source_hash), f"exported to {path}"
    except OSError:  # a read-only model folder: export for this run only
        folder = pathlib.Path(tempfile.mkdtemp(prefix="segtool_onnx_"))
        return (export_onnx(loaded.model, folder / "model.onnx", source_hash),
                f"exported to {folder} ({path.parent} is not writable)")


def onnx_session(path, threads=None):
    """An ONNX Runtime CPU session for ``path``; ``threads`` None = ONNX Runtime's default (one per
    physical core)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_call(session):
    """float32 [B, H, W, C] -> numpy float32 logits, through ``session``."""
    name = session.get_inputs()[0].name

    def call(batch):
        return session.run(None, {name: np.ascontiguousarray(batch, np.float32)})[0]

    return call


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is missing)."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def precision_warning(precision, device, flags=None, compute_capability=None, gpu_index=0):
    """None, or why ``precision`` is unlikely to be faster than float32 on ``device`` ("/CPU:0",
    "/GPU:0"): a CPU without AMX for bfloat16 (the only CPU where a gain was measured), any CPU for
    float16 (measured slower), a GPU older than the precision's tensor cores. ``flags`` (CPU) and
    ``compute_capability`` (GPU) default to this machine's: the CPU's, and that of physical GPU
    ``gpu_index``."""
    if precision == "float32":
        return None
    if "GPU" in device:
        if compute_capability is None:
            import tensorflow as tf
            gpu = tf.config.list_physical_devices("GPU")[gpu_index]
            compute_capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        needed = (8, 0) if precision == "bfloat16" else (7, 0)
        if compute_capability is None or tuple(compute_capability) >= needed:
            return None
        return (f"--precision {precision}: this GPU (compute capability {compute_capability[0]}."
                f"{compute_capability[1]}) has no {precision} tensor cores (they need {needed[0]}.{needed[1]}): "
                f"expect it no faster than float32")
    if precision == "float16":
        return ("--precision float16 on a CPU: measured slower than float32 (0.77x for the default UNet "
                "on a Xeon with AVX512-FP16); use bfloat16 on a CPU with AMX")
    if "amx_bf16" not in (cpu_flags() if flags is None else flags):
        return ("--precision bfloat16: this CPU has no AMX-BF16 unit (no 'amx_bf16' in /proc/cpuinfo); "
                "bfloat16 was measured faster only with AMX: expect little or no gain over float32")
    return None


def check_choice(engine, precision="float32"):
    """EngineError naming the flag unless ``engine`` can run the network in ``precision``."""
    if engine not in ENGINES:
        raise EngineError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision != "float32" and engine != "tensorflow":
        raise EngineError(f"--precision {precision} runs on --engine tensorflow only (the ONNX export "
                          f"computes in float32)")


def make_forward(engine, loaded, announce=print, precision="float32"):
    """The forward function of ``engine`` for the models ``loaded`` (checkpoints.LoadedModel list):
    one model, or an ensemble whose softmax is averaged (predictor.combine_members). ``precision``
    other than float32 runs on the TensorFlow engine only (models.with_precision)."""
    check_choice(engine, precision)
    if engine == "tensorflow":
        try:
            return predictor.make_predictor([models.with_precision(member.model, precision)
                                             for member in loaded])
        except ValueError as exc:  # a model that must not compute in 16 bits (models.PRECISION_PROBLEM)
            raise EngineError(f"--precision {precision}: {exc}") from exc
    calls = []
    for member in loaded:
        path, note = cached_onnx(member)
        announce(f"onnx: {member.source}: {note}")
        calls.append(session_call(onnx_session(path)))
    return predictor.combine_members(calls)
