"""The engines that run the network for inference: TensorFlow, or ONNX Runtime on an ONNX export.

    forward = engines.make_forward("onnxruntime", loaded)    # loaded: checkpoints.LoadedModel list
    logits = forward(batch)                                  # float32 [B, H, W, C] -> [B, H, W, K]

Both give the same callable as predictor.make_predictor, so tiling, halos, --tta and ensembles are
those of the TensorFlow path (predictor.iter_bands drives either). The ONNX graph is exported from
the Keras model by Keras 3's own exporter (``model.export(format="onnx")``, which runs tf2onnx) with
free batch, height and width, and cached beside the model as ``<model>.onnx`` (``model.onnx`` in a
checkpoint folder): an export takes seconds for a small UNet but over a minute for the default one
(base_filters 64) on a 2-core CPU. The cache records the SHA-256 of the file it was made from and is
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
import predictor

ENGINES = ("tensorflow", "onnxruntime")
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
    return source / "model.onnx" if source.is_dir() else source.with_suffix(".onnx")


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


def make_forward(engine, loaded, announce=print):
    """The forward function of ``engine`` for the models ``loaded`` (checkpoints.LoadedModel list):
    one model, or an ensemble whose softmax is averaged (predictor.combine_members)."""
    if engine not in ENGINES:
        raise EngineError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "tensorflow":
        return predictor.make_predictor([member.model for member in loaded])
    calls = []
    for member in loaded:
        path, note = cached_onnx(member)
        announce(f"onnx: {member.source}: {note}")
        calls.append(session_call(onnx_session(path)))
    return predictor.combine_members(calls)
