"""One network call per engine, side by side: where the CPU time of inference goes without tiling,
reading or writing (issue 25's engine choice).

For the default UNet (base_filters 64, 512 px tile), the planner's GPU width (base_filters 32, 512 px)
and a small one (base_filters 8, 1,024 px), random weights, one tile: Mpx/s of the TensorFlow path
inference uses (a tf.function around the Keras model), the same with XLA (jit_compile=True), the
same model in bfloat16 (inference.py --precision bfloat16: models.with_precision), and ONNX Runtime
on Keras's ONNX export, each the median of 8 calls interleaved between the engines (so a change of
the machine's load hits all of them), and each engine's largest logit difference from TensorFlow's.
One line per model; about 3 minutes on 2 cores (most of it the ONNX exports).

Run from the repo root, alone on the machine: .venv/bin/python benchmarks/bench_engine_call.py
"""
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
import models  # noqa: E402

CASES = ((64, 512), (32, 512), (8, 1024))   # (base_filters, tile side)
ROUNDS, CALLS_PER_ROUND = 4, 2


def engine_calls(model, folder):
    """name -> callable float32 [1, H, W, 1] -> numpy logits."""
    import tensorflow as tf

    spec = [tf.TensorSpec([None, None, None, 1], tf.float32)]
    plain = tf.function(lambda x: model(x, training=False), input_signature=spec)
    xla = tf.function(lambda x: model(x, training=False), input_signature=spec, jit_compile=True)
    reduced = models.with_precision(model, "bfloat16")
    bfloat16 = tf.function(lambda x: reduced(x, training=False), input_signature=spec)
    session = engines.session_call(engines.onnx_session(engines.export_onnx(model, folder / "model.onnx")))
    return {"tensorflow": lambda x: plain(tf.constant(x)).numpy(),
            "tensorflow+xla": lambda x: xla(tf.constant(x)).numpy(),
            "tensorflow bfloat16": lambda x: bfloat16(tf.constant(x)).numpy(),
            "onnxruntime": session}


def main():
    for base_filters, side in CASES:
        model = models.build_model("unet", 2, 1, base_filters=base_filters)
        tile = np.random.default_rng(0).normal(size=(1, side, side, 1)).astype(np.float32)
        with tempfile.TemporaryDirectory() as folder:
            calls = engine_calls(model, pathlib.Path(folder))
            reference = calls["tensorflow"](tile)
            differences = {name: float(np.abs(call(tile) - reference).max()) for name, call in calls.items()}
            seconds = {name: [] for name in calls}
            for _ in range(ROUNDS):
                for name, call in calls.items():
                    for _ in range(CALLS_PER_ROUND):
                        start = time.perf_counter()
                        call(tile)
                        seconds[name].append(time.perf_counter() - start)
        median = {name: float(np.median(values)) for name, values in seconds.items()}
        print(f"bench_engine_call: base_filters {base_filters}, {side} px tile: " + ", ".join(
            f"{name} {side * side / median[name] / 1e6:.3f} Mpx/s (x{median['tensorflow'] / median[name]:.2f}, "
            f"max |logit diff| {differences[name]:.1e})" for name in calls), flush=True)


if __name__ == "__main__":
    main()
