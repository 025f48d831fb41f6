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
        scales = len(cfg.rootsift_cell_px)
        grid = np.empty((scales, len(ys), len(xs), 128), np.float32)
        valid = np.empty((scales, len(ys), len(xs)), bool)
        for scale, cell in enumerate(cfg.rootsift_cell_px):
            sigma = cell / cfg.rootsift_magnification
            smooth = cv2.GaussianBlur(grey, (0, 0), sigma) if sigma > 0.25 else grey
            dense_sift(orientation_channels(smooth), ys, xs, cell, out=grid[scale])
            norms = np.linalg.norm(grid[scale], axis=-1)
            root_sift(grid[scale], norms)
            np.greater(norms, cfg.rootsift_min_contrast, out=valid[scale])
        return LocalFeatures(grid.reshape(-1, len(xs), 128), valid.reshape(-1, len(xs)))


def orientation_channels(grey: np.ndarray) -> np.ndarray:
    """[H x W x 8] float32: gradient magnitude split over 8 orientation bins (linear weights)."""
    import cv2

    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=1)
    magnitude, angle = cv2.cartToPolar(gx, gy)  # angle in [0, 2 pi)
    position = angle.ravel() * np.float32(_NUM_ORIENTATIONS / (2 * np.pi))
    lower = np.floor(position)
    upper_weight = position - lower
    magnitude = magnitude.ravel()
    # flat indices into the [pixels x 8] output of each pixel's lower and upper bin
    lower_index = lower.astype(np.intp) % _NUM_ORIENTATIONS
    upper_index = (lower_index + 1) % _NUM_ORIENTATIONS
    base = np.arange(0, magnitude.size * _NUM_ORIENTATIONS, _NUM_ORIENTATIONS)
    channels = np.zeros((*grey.shape, _NUM_ORIENTATIONS), np.float32)
    flat = channels.reshape(-1)
    flat[base + lower_index] = magnitude * (1 - upper_weight)
    flat[base + upper_index] += magnitude * upper_weight
    return channels


def dense_sift(
    channels: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    cell_px: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Unnormalised SIFT vectors [len(ys) x len(xs) x 128] centred on the grid ys x xs.

    ``channels`` [H x W x 8] float32 is pooled with a triangular filter of half-width
    ``cell_px`` (bilinear binning), then read at the 4x4 cell centres around each grid point;
    element (i * 4 + j) * 8 + o of a vector is cell row i, cell column j, orientation o.
    ``out`` (optional, [len(ys) x len(xs) x 128] float32) receives the result.
    """
    import cv2

    ramp = np.arange(1, cell_px + 1, dtype=np.float32)
    kernel = np.concatenate([ramp, ramp[-2::-1]]) / (cell_px * cell_px)
    pooled = cv2.sepFilter2D(channels, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    cy = np.clip(
        np.rint(ys[:, None] + _CELL_OFFSETS * cell_px).astype(int), 0, pooled.shape[0] - 1
    )  # [rows x 4]
    cx = np.clip(
        np.rint(xs[:, None] + _CELL_OFFSETS * cell_px).astype(int), 0, pooled.shape[1] - 1
    )  # [cols x 4]
    if out is None:
        out = np.empty((len(ys), len(xs), 128), np.float32)
    cells = out.reshape(len(ys), len(xs), 4, 4, _NUM_ORIENTATIONS)
    for i in range(4):
        rows = pooled[cy[:, i]]  # [rows x W x 8]
        for j in range(4):
            np.multiply(rows[:, cx[:, j]], np.float32(_WINDOW[i, j]), out=cells[:, :, i, j])
    return out


def root_sift(raw: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """In place: SIFT normalisation (L2, clamp 0.2, L2) then RootSIFT (L1, sqrt); unit-L2 rows.

    ``raw`` [... x 128] float32 is overwritten and returned; ``norms`` [...] are its L2 norms.
    """
    raw /= np.maximum(norms[..., None], 1e-12)
    np.minimum(raw, 0.2, out=raw)
    raw /= np.maximum(raw.sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(raw, out=raw)
