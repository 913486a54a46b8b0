"""Could a float32 engine reach issue 25's 1.5x on this CPU? Winograd convolution, the one algorithm
that needs fewer multiplications than a direct 3x3 convolution, measured layer by layer.

TensorFlow's 3x3 convolutions already run near the float32 peak of the CPU (bench_engine_call.py), so
a faster float32 engine has to do fewer multiplications. Winograd F(4x4, 3x3) computes each 4 x 4
block of outputs from a 6 x 6 block of inputs with 36 products per channel pair instead of 144 (4x
fewer), at the price of transforming inputs and outputs (memory traffic). This script measures, for
every 3x3 convolution of the default UNet (base_filters 64) on one 512 px tile, random weights:

- the direct convolution (tf.nn.conv2d in a tf.function, what inference runs), median of 5 calls,
  and its rate in GFLOP/s;
- Winograd F(4x4, 3x3) written here in TensorFlow ops, compiled by XLA (which fuses the transforms;
  without XLA they cost 3-7x the convolution), median of 5 calls, and its largest error relative to
  the direct result's largest magnitude;

and prints one line: the whole network's call time, and the bound on its speed-up if every layer used
the faster of the two (the other layers, the transposed convolutions, ReLUs and concatenations, kept
at their cost). About 2 minutes on 2 cores.

Run from the repo root, alone on the machine: .venv/bin/python benchmarks/bench_winograd.py
"""
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402

SIDE, CALLS = 512, 5

# F(4x4, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A for a 6 x 6 input block d.
B_T = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
               np.float64)
OUT, BLOCK = 4, 6


def kernel_transform(kernel):
    """[3, 3, Cin, Cout] kernel -> [36, Cin, Cout] Winograd-domain kernel (once per layer, float64)."""
    transformed = np.einsum("ij,jkco,lk->ilco", G, kernel.astype(np.float64), G)
    return transformed.reshape(BLOCK * BLOCK, *kernel.shape[2:]).astype(np.float32)


def _combine(parts, matrix):
    """Rows of ``matrix`` applied to the list ``parts`` (skipping zero coefficients)."""
    out = []
    for row in matrix:
        terms = [part * float(c) if c not in (1, -1) else (part if c == 1 else -part)
                 for c, part in zip(row, parts) if c]
        out.append(sum(terms[1:], terms[0]))
    return out


def winograd_conv(x, kernel_w):
    """'same' 3x3 convolution of x [N, H, W, C] (H, W multiples of 4) by a kernel_transform result."""
    import tensorflow as tf

    n, height, width, _ = x.shape
    rows, cols = height // OUT, width // OUT
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    # The input transform is separable: B^T along the rows of overlapping 6-high windows (stride 4),
    # then along the columns.
    by_rows = _combine([padded[:, j:j + OUT * rows:OUT] for j in range(BLOCK)], B_T)
    blocks = [v for part in by_rows
              for v in _combine([part[:, :, j:j + OUT * cols:OUT] for j in range(BLOCK)], B_T)]
    products = tf.matmul(tf.reshape(tf.stack(blocks), (BLOCK * BLOCK, n * rows * cols, -1)), kernel_w)
    products = tf.reshape(products, (BLOCK, BLOCK, n, rows, cols, -1))
    by_rows = _combine([products[j] for j in range(BLOCK)], A_T)
    out = [_combine([part[j] for j in range(BLOCK)], A_T) for part in by_rows]
    out = tf.stack([tf.stack(row, axis=3) for row in out], axis=2)     # [N, rows, 4, cols, 4, Cout]
    return tf.reshape(out, (n, height, width, -1))


def median_seconds(call, x):
    call(x)                                                  # trace / compile
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    import keras
    import tensorflow as tf

    model = models.build_model("unet", 2, 1, base_filters=64, input_size=SIDE)
    rng = np.random.default_rng(0)
    whole = tf.function(lambda x: model(x, training=False))
    network = median_seconds(whole, tf.constant(rng.normal(size=(1, SIDE, SIDE, 1)), tf.float32))
    direct_total = best_total = 0.0
    worst_error, layers, rates = 0.0, [], []
    for layer in model.layers:
        if type(layer) is not keras.layers.Conv2D or layer.kernel.shape[:2] != (3, 3):
            continue
        kernel = layer.kernel.numpy()
        side = layer.output.shape[1]
        x = tf.constant(rng.normal(size=(1, side, side, kernel.shape[2])), tf.float32)
        direct = tf.function(lambda x, k=tf.constant(kernel): tf.nn.conv2d(x, k, 1, "SAME"))
        winograd = tf.function(lambda x, k=tf.constant(kernel_transform(kernel)): winograd_conv(x, k),
                               jit_compile=True)
        reference = direct(x).numpy()
        worst_error = max(worst_error, float(np.abs(winograd(x).numpy() - reference).max()
                                             / np.abs(reference).max()))
        if worst_error > 1e-3:      # a wrong transform must not publish a speed
            raise SystemExit(f"bench_winograd: {layer.name}: Winograd off by {worst_error:.1e} of the output")
        t_direct, t_winograd = median_seconds(direct, x), median_seconds(winograd, x)
        direct_total += t_direct
        rates.append(2 * side * side * kernel.size / t_direct / 1e9)
        best_total += min(t_direct, t_winograd)
        layers.append(f"{kernel.shape[2]}->{kernel.shape[3]}@{side} x{t_direct / t_winograd:.2f}")
    bound = network / (network - direct_total + best_total)
    print(f"bench_winograd: default UNet, {SIDE} px tile: network call {network * 1e3:.0f} ms, its 3x3 "
          f"convolutions {direct_total * 1e3:.0f} ms direct ({min(rates):.0f}-{max(rates):.0f} GFLOP/s), {best_total * 1e3:.0f} ms with the faster of "
          f"direct / Winograd F(4x4,3x3) per layer -> whole-call bound x{bound:.2f}; "
          f"max relative error {worst_error:.1e}; per layer Winograd vs direct: {', '.join(layers)}",
          flush=True)


if __name__ == "__main__":
    main()
