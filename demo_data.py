"""A synthetic microscopy dataset, so a new user can run the whole tool with no data of their own.

    python demo_data.py --output_folder demo_output/data [--num_images 48] [--size 256] [--seed 0]

Writes <output_folder>/images/demo_NNN.tif (uint16, phase-contrast-like) and
<output_folder>/masks/demo_NNN.tif (uint8: 0 background, 1 round colonies, 2 elongated cells).
The images have a textured background, uneven illumination, shot and read noise, and objects
surrounded by the bright halos typical of phase contrast; the two classes differ in shape and
in texture, so a small network can learn to tell them apart.
"""
import argparse
import os
import sys

import numpy as np
import tifffile
from scipy import ndimage

import image_io

BACKGROUND, COLONY, CELL = 0, 1, 2
CLASS_NAMES = {BACKGROUND: "background", COLONY: "colony", CELL: "cell"}


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-std Gaussian-filtered noise: texture at a spatial scale of ~sigma pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def _coarse_noise(rng, size, cells):
    """Zero-mean, unit-std noise varying smoothly over size / cells pixels.

    Interpolating a small random grid is much cheaper than a wide Gaussian filter.
    """
    field = ndimage.zoom(rng.standard_normal((cells, cells)).astype(np.float32), size / cells, order=3)
    return (field - field.mean()) / (field.std() + 1e-8)


def _colony(rng, cy, cx):
    """A round colony with a wavy outline.

    Returns:
      (extent, ratio): the largest distance of its outline from (cy, cx), and a function of pixel
      coordinates giving distance / outline radius (< 1 inside).
    """
    radius = rng.uniform(10, 26)
    # A few low harmonics make the outline irregular but still round.
    amplitudes = rng.uniform(0.0, 0.06, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)

    def ratio(yy, xx):
        theta = np.arctan2(yy - cy, xx - cx)
        outline = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip(range(2, 6), amplitudes, phases))
        return np.hypot(yy - cy, xx - cx) / (radius * outline)

    return radius * (1.0 + amplitudes.sum()), ratio


def _cell(rng, cy, cx):
    """A rod-shaped cell (a capsule); returns (extent, ratio) like ``_colony``."""
    length = rng.uniform(14, 34)
    half_width = rng.uniform(2.5, 4.5)
    angle = rng.uniform(0, np.pi)

    def ratio(yy, xx):
        along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        across = -(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        along = np.maximum(np.abs(along) - length / 2, 0)
        return np.hypot(along, across) / half_width

    return length / 2 + half_width, ratio


def generate_pair(rng, size=256):
    """One (image uint16 H x W, mask uint8 H x W) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    # Optical density of the specimen: 0 for empty medium, positive inside objects.
    density = np.zeros((size, size), np.float32)
    fine = _smooth_noise(rng, (size, size), 0.8)
    wanted = [COLONY] * int(rng.integers(2, 6)) + [CELL] * int(rng.integers(3, 10))
    for label in wanted:
        for _attempt in range(20):
            cy, cx = rng.uniform(0, size, 2)
            extent, ratio_of = (_colony if label == COLONY else _cell)(rng, cy, cx)
            # Work in a window around the object: 1.4 x its extent holds the gap checked below.
            reach = int(np.ceil(1.4 * extent)) + 2
            window = (slice(max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)),
                      slice(max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)))
            ratio = ratio_of(yy[window], xx[window])
            inside = ratio < 1.0
            # Keep a gap between objects so every object has its own halo, as on a sparse plate.
            if inside.sum() < 30 or (mask[window][ratio < 1.4] != BACKGROUND).any():
                continue
            mask[window][inside] = label
            if label == COLONY:
                # Dense, smooth colonies: darker towards the rim, slightly granular.
                density[window][inside] += 0.45 + 0.15 * ratio[inside] + 0.05 * fine[window][inside]
            else:
                # Cells: darker, with a strong granular texture.
                density[window][inside] += 0.6 + 0.2 * fine[window][inside]
            break

    # Phase contrast: objects dark, a bright halo just outside their edges.
    outside_distance = ndimage.distance_transform_edt(mask == BACKGROUND).astype(np.float32)
    halo = np.where(mask == BACKGROUND, 0.35 * np.exp(-outside_distance / 2.5), 0.0)
    signal = 1.0 - density + halo
    signal += 0.03 * _smooth_noise(rng, (size, size), 1.5) + 0.04 * _coarse_noise(rng, size, size // 16)
    signal = ndimage.gaussian_filter(signal, 0.8)  # the microscope's blur

    # Uneven illumination: a tilted, vignetted field with a random centre.
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    vignette = 1.0 - 0.35 * (np.hypot(yy - cy, xx - cx) / size) ** 2
    tilt = 1.0 + 0.15 * ((yy - size / 2) * rng.uniform(-1, 1) + (xx - size / 2) * rng.uniform(-1, 1)) / size
    illumination = vignette * tilt * (1 + 0.05 * _coarse_noise(rng, size, 4))

    photons = np.clip(rng.uniform(2500, 4500) * signal * illumination, 0, None)
    counts = 1000.0 + rng.poisson(photons) + rng.normal(0, 30, photons.shape)  # offset, shot, read noise
    image = np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return image, mask


def generate_demo_dataset(out_dir, num_images=48, size=256, seed=0):
    """Write out_dir/images/*.tif and out_dir/masks/*.tif; return (image_folder, mask_folder)."""
    if num_images < 1 or size < 32:
        raise ValueError(f"need num_images >= 1 and size >= 32; got {num_images} and {size}")
    image_folder = os.path.join(out_dir, "images")
    mask_folder = os.path.join(out_dir, "masks")
    os.makedirs(image_folder, exist_ok=True)
    os.makedirs(mask_folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        image, mask = generate_pair(rng, size)
        name = f"demo_{index:03d}.tif"
        # Whole files or none: the demo reuses data it finds, and must never reuse a half-written one.
        image_io.atomic_write(os.path.join(image_folder, name), lambda f: tifffile.imwrite(f, image))
        image_io.atomic_write(os.path.join(mask_folder, name), lambda f: tifffile.imwrite(f, mask))
    return image_folder, mask_folder


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic phase-contrast segmentation dataset.")
    parser.add_argument("--output_folder", default=os.path.join("demo_output", "data"),
                        help="receives images/ and masks/ (default demo_output/data)")
    parser.add_argument("--num_images", type=int, default=48, help="number of image/mask pairs (default 48)")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        image_folder, mask_folder = generate_demo_dataset(args.output_folder, args.num_images, args.size, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.num_images} images to {image_folder} and their masks to {mask_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
