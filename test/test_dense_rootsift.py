"""Dense RootSIFT: descriptor properties checked against slow direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_vpr.backends.features.dense_rootsift import (
    DenseRootSift,
    dense_sift,
    orientation_channels,
)
from vlm_vpr.core.config import FeatureConfig, RuntimeConfig
from vlm_vpr.core.images import read_image


def test_orientation_channels_split_gradient_magnitude_between_two_bins() -> None:
    grey = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    channels = orientation_channels(grey)
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, 1:-1] = (grey[:, 2:] - grey[:, :-2]) / 2 * 2  # Sobel ksize=1: central difference
    gy[1:-1, :] = (grey[2:, :] - grey[:-2, :]) / 2 * 2
    inner = (slice(1, -1), slice(1, -1))
    magnitude = np.hypot(gx, gy)[inner]
    np.testing.assert_allclose(channels.sum(axis=0)[inner], magnitude, rtol=1e-4, atol=1e-5)
    assert ((channels > 1e-7).sum(axis=0) <= 2).all()
    angle = np.mod(np.arctan2(gy, gx), 2 * np.pi)[inner]
    dominant = channels.argmax(axis=0)[inner]
    expected = np.rint(angle / (2 * np.pi / 8)).astype(int) % 8
    assert np.mean(dominant == expected) > 0.98


def test_dense_sift_reads_the_pooled_cells_around_each_grid_point() -> None:
    channels = np.zeros((8, 64, 64), np.float32)
    channels[3, 28:36, 28:36] = 1.0  # energy in orientation 3 at the image centre only
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


def test_flat_textureless_patches_are_dropped() -> None:
    image = np.full((240, 320, 3), 128, np.uint8)
    image[:, 160:] = np.random.default_rng(0).integers(0, 255, (240, 160, 3))
    features = DenseRootSift(FeatureConfig(), RuntimeConfig()).extract([image])[0]
    assert 0.2 < features.valid.mean() < 0.8
