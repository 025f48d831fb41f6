"""Weight-free dense RootSIFT at several scales, fully vectorised (no per-keypoint loops).

Like VLFeat's dense SIFT: the image gradient is split into 8 orientation channels (linear
interpolation between the two nearest bins), each channel is pooled with a separable
triangular filter of one cell's width (bilinear spatial binning), and a descriptor is the 4x4
cells x 8 orientations read at a grid point, Gaussian-windowed. SIFT normalisation (L2, clamp
at 0.2) is followed by RootSIFT (L1-normalise, square root), giving unit-L2 rows whose inner
products are Hellinger kernels (Arandjelovic & Zisserman 2012). Scales are cell sizes, as in
DenseVLAD (Torii et al. 2015); each scale first smooths the image with a Gaussian of sigma =
cell / magnification (as VLFeat's PHOW); descriptors of low-contrast patches are dropped.
"""

from __future__ import annotations

import numpy as np

from vlm_vpr.core.config import FeatureConfig, RuntimeConfig
from vlm_vpr.core.images import resize_shorter_side
from vlm_vpr.core.types import LocalFeatures

_NUM_ORIENTATIONS = 8
_CELL_OFFSETS = np.arange(4) - 1.5  # cell centres relative to the descriptor centre, in cells
_WINDOW = np.exp(-(_CELL_OFFSETS[:, None] ** 2 + _CELL_OFFSETS[None, :] ** 2) / (2 * 2.0**2))


class DenseRootSift:
    """Dense multi-scale RootSIFT: [scales*rows x cols x 128] float32 grid, unit-L2 rows."""

    def __init__(self, features: FeatureConfig, runtime: RuntimeConfig) -> None:
        import cv2

        if runtime.num_threads > 0:
            cv2.setNumThreads(runtime.num_threads)
        self._features = features

    def extract(self, images_bgr: list[np.ndarray]) -> list[LocalFeatures]:
        return [self._extract_one(image) for image in images_bgr]

    def _extract_one(self, image_bgr: np.ndarray) -> LocalFeatures:
        import cv2

        grey = image_bgr if image_bgr.ndim == 2 else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        grey = resize_shorter_side(grey, self._features.image_size_px).astype(np.float32) / 255
        cfg = self._features
        margin = 2 * max(cfg.rootsift_cell_px)
        h, w = grey.shape
        ys = np.arange(margin, h - margin + 1, cfg.rootsift_step_px)
        xs = np.arange(margin, w - margin + 1, cfg.rootsift_step_px)
        grids, valid = [], []
        for cell in cfg.rootsift_cell_px:
            sigma = cell / cfg.rootsift_magnification
            smooth = cv2.GaussianBlur(grey, (0, 0), sigma) if sigma > 0.25 else grey
            raw = dense_sift(orientation_channels(smooth), ys, xs, cell)  # [rows x cols x 128]
            norms = np.linalg.norm(raw, axis=-1)
            grids.append(root_sift(raw, norms))
            valid.append(norms > cfg.rootsift_min_contrast)
        return LocalFeatures(np.concatenate(grids), np.concatenate(valid))


def orientation_channels(grey: np.ndarray) -> np.ndarray:
    """[8 x H x W] float32: gradient magnitude split over 8 orientation bins (linear weights)."""
    import cv2

    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=1)
    magnitude, angle = cv2.cartToPolar(gx, gy)  # angle in [0, 2 pi)
    position = (angle * (_NUM_ORIENTATIONS / (2 * np.pi))).ravel()
    lower = np.floor(position)
    upper_weight = position - lower
    lower = lower.astype(np.intp) % _NUM_ORIENTATIONS
    flat_magnitude = magnitude.ravel()
    pixels = np.arange(flat_magnitude.size)
    channels = np.zeros((_NUM_ORIENTATIONS, flat_magnitude.size), np.float32)
    channels[lower, pixels] = flat_magnitude * (1 - upper_weight)
    channels[(lower + 1) % _NUM_ORIENTATIONS, pixels] += flat_magnitude * upper_weight
    channels = channels.reshape(_NUM_ORIENTATIONS, *grey.shape)
    return channels


def dense_sift(channels: np.ndarray, ys: np.ndarray, xs: np.ndarray, cell_px: int) -> np.ndarray:
    """Unnormalised SIFT vectors [len(ys) x len(xs) x 128] centred on the grid ys x xs.

    Each channel is pooled with a triangular filter of half-width ``cell_px`` (bilinear
    binning), then read at the 4x4 cell centres around each grid point.
    """
    import cv2

    ramp = np.arange(1, cell_px + 1, dtype=np.float32)
    kernel = np.concatenate([ramp, ramp[-2::-1]]) / (cell_px * cell_px)
    pooled = np.stack(
        [cv2.sepFilter2D(c, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT) for c in channels]
    )  # [8 x H x W]
    cy = np.clip(
        np.rint(ys[:, None] + _CELL_OFFSETS * cell_px).astype(int), 0, pooled.shape[1] - 1
    )  # [rows x 4]
    cx = np.clip(
        np.rint(xs[:, None] + _CELL_OFFSETS * cell_px).astype(int), 0, pooled.shape[2] - 1
    )  # [cols x 4]
    cells = pooled[:, cy[:, :, None, None], cx[None, None, :, :]]  # [8 x rows x 4 x cols x 4]
    cells = cells * _WINDOW[None, None, :, None, :]
    return cells.transpose(1, 3, 2, 4, 0).reshape(len(ys), len(xs), 128)


def root_sift(raw: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """SIFT normalisation (L2, clamp 0.2, L2) then RootSIFT (L1, sqrt); unit-L2 output."""
    sift = np.minimum(raw / np.maximum(norms[..., None], 1e-12), 0.2)
    sift /= np.maximum(sift.sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(sift).astype(np.float32)
