"""Dense RootSIFT: descriptor properties checked against slow direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.backends.features.dense_rootsift import (
    DenseRootSift,
    dense_sift,
    orientation_channels,
)
from vlm_vpr.core.config import FeatureConfig, RuntimeConfig, VladConfig
from vlm_vpr.core.errors import ImageError
from vlm_vpr.core.images import read_image, resize_shorter_side
from vlm_vpr.core.vlad import aggregate_vlad, fit_codebook


def test_orientation_channels_split_gradient_magnitude_between_two_bins() -> None:
    grey = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    channels = orientation_channels(grey)
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, 1:-1] = (grey[:, 2:] - grey[:, :-2]) / 2 * 2  # Sobel ksize=1: central difference
    gy[1:-1, :] = (grey[2:, :] - grey[:-2, :]) / 2 * 2
    inner = (slice(1, -1), slice(1, -1))
    magnitude = np.hypot(gx, gy)[inner]
    np.testing.assert_allclose(channels.sum(axis=-1)[inner], magnitude, rtol=1e-4, atol=1e-5)
    assert ((channels > 1e-7).sum(axis=-1) <= 2).all()
    angle = np.mod(np.arctan2(gy, gx), 2 * np.pi)[inner]
    dominant = channels.argmax(axis=-1)[inner]
    expected = np.rint(angle / (2 * np.pi / 8)).astype(int) % 8
    assert np.mean(dominant == expected) > 0.98


def test_dense_sift_reads_the_pooled_cells_around_each_grid_point() -> None:
    channels = np.zeros((64, 64, 8), np.float32)
    channels[28:36, 28:36, 3] = 1.0  # energy in orientation 3 at the image centre only
    raw = dense_sift(channels, np.array([32]), np.array([32, 12]), cell_px=4)
    centre, far = raw[0, 0].reshape(4, 4, 8), raw[0, 1].reshape(4, 4, 8)
    assert centre[:, :, 3].sum() > 0 and np.allclose(np.delete(centre, 3, axis=2), 0)
    assert centre[1:3, 1:3, 3].min() > centre[0, 0, 3]  # inner cells see more of the blob
    assert far.sum() < centre.sum() / 10


def test_extractor_returns_unit_rootsift_rows_on_a_real_image(data_root: Path) -> None:
    image = read_image(data_root / 'gardens_point' / 'day_left' / 'images' / 'Image010.jpg')
    features = DenseRootSift(FeatureConfig(), RuntimeConfig()).extract([image])[0]
    flat = features.flat
    assert features.descriptors.shape[-1] == 128 and len(flat) > 5000
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-5)
    assert (flat >= 0).all(), 'RootSIFT entries are square roots'
    assert features.valid is not None and 0 < features.valid.mean() <= 1


def test_extractor_rejects_a_thin_strip_instead_of_scaling_it_up() -> None:
    # a 30 x 300 strip would become 240 x 2400 (2 x 1500: 240 x 180000, minutes and GBs)
    strip = np.random.default_rng(0).integers(0, 255, (30, 300, 3), dtype=np.uint8)
    with pytest.raises(ImageError, match='300x30 is 10:1, beyond the 8:1 aspect ratio limit'):
        DenseRootSift(FeatureConfig(), RuntimeConfig()).extract([strip])


def test_flat_textureless_patches_are_dropped() -> None:
    image = np.full((240, 320, 3), 128, np.uint8)
    image[:, 160:] = np.random.default_rng(0).integers(0, 255, (240, 160, 3))
    features = DenseRootSift(FeatureConfig(), RuntimeConfig()).extract([image])[0]
    assert 0.2 < features.valid.mean() < 0.8


def reference_sift(channels: np.ndarray, y: int, x: int, cell_px: int) -> np.ndarray:
    """Slow direct SIFT vector [128] at (y, x) of [H x W x 8] channels: each of the 4x4 cells
    sums the channels under a triangular (bilinear) weight of half-width ``cell_px`` around the
    cell centre, times the Gaussian window (sigma 2 cells); cell row, column, orientation order."""
    offsets = np.arange(4) - 1.5
    taps = np.arange(-cell_px + 1, cell_px)
    weight = (cell_px - np.abs(taps)) / cell_px**2
    vector = np.zeros((4, 4, 8))
    for i, oy in enumerate(offsets):
        for j, ox in enumerate(offsets):
            cy, cx = int(np.rint(y + oy * cell_px)), int(np.rint(x + ox * cell_px))
            patch = channels[cy + taps][:, cx + taps]  # [taps x taps x 8]
            pooled = np.einsum('a,b,abo->o', weight, weight, patch)
            vector[i, j] = pooled * np.exp(-(oy**2 + ox**2) / (2 * 2.0**2))
    return vector.reshape(-1)


def test_dense_sift_equals_a_direct_per_point_computation() -> None:
    rng = np.random.default_rng(1)
    channels = rng.random((60, 70, 8)).astype(np.float32)
    ys, xs = np.array([20, 24, 37]), np.array([18, 30, 51])
    got = dense_sift(channels, ys, xs, cell_px=5)
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            np.testing.assert_allclose(
                got[r, c], reference_sift(channels, y, x, 5), rtol=1e-5, atol=1e-6
            )


def test_descriptors_of_real_images_equal_the_direct_computation_and_keep_top1(
    data_root: Path,
) -> None:
    """The vectorised extractor against :func:`reference_sift` on sampled grid points of real
    images (cosine >= 0.9999), and day_right -> day_left VLAD top-1 on Gardens Point."""
    import cv2

    config = FeatureConfig()
    extractor = DenseRootSift(config, RuntimeConfig(num_threads=1))
    folder = data_root / 'gardens_point'
    names = [f'Image{i:03d}.jpg' for i in (5, 60, 120, 180)]
    database = extractor.extract([read_image(folder / 'day_left' / 'images' / n) for n in names])
    queries = extractor.extract([read_image(folder / 'day_right' / 'images' / n) for n in names])

    image = read_image(folder / 'day_left' / 'images' / names[0])
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    grey = resize_shorter_side(grey, config.image_size_px).astype(np.float32) / 255
    margin = 2 * max(config.rootsift_cell_px)
    ys = np.arange(margin, grey.shape[0] - margin + 1, config.rootsift_step_px)
    xs = np.arange(margin, grey.shape[1] - margin + 1, config.rootsift_step_px)
    rng = np.random.default_rng(0)
    grid = database[0].descriptors.reshape(len(config.rootsift_cell_px), len(ys), len(xs), 128)
    for scale, cell in enumerate(config.rootsift_cell_px):
        smooth = cv2.GaussianBlur(grey, (0, 0), cell / config.rootsift_magnification)
        channels = orientation_channels(smooth)
        for r, c in zip(rng.integers(0, len(ys), 20), rng.integers(0, len(xs), 20)):
            raw = reference_sift(channels, ys[r], xs[c], cell)
            sift = np.minimum(raw / np.linalg.norm(raw), 0.2)
            expected = np.sqrt(sift / sift.sum())
            assert grid[scale, r, c] @ expected >= 0.9999

    vlad = VladConfig(num_clusters=32)
    codebook = fit_codebook([f.flat for f in database], vlad)
    db = np.stack([aggregate_vlad(f.flat, codebook, vlad) for f in database])
    top1 = [int(np.argmax(db @ aggregate_vlad(q.flat, codebook, vlad))) for q in queries]
    assert top1 == list(range(len(names)))
