"""Weight-free dense RootSIFT: SIFT descriptors on a regular grid, Hellinger-normalised.

RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise the SIFT vector, take the element-wise
square root; the result has unit L2 norm, so inner products are Hellinger kernels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from vlm_vpr.core.config import FeatureConfig, RuntimeConfig
from vlm_vpr.core.images import resize_shorter_side
from vlm_vpr.core.types import LocalFeatures


class DenseRootSift:
    """Dense RootSIFT grid ([rows x cols x 128] float32, unit L2 rows) per image."""

    def __init__(self, features: FeatureConfig, runtime: RuntimeConfig) -> None:
        import cv2

        if runtime.num_threads > 0:
            cv2.setNumThreads(runtime.num_threads)
        self._features = features
        self._sift = cv2.SIFT_create()

    def extract(self, images_bgr: list[np.ndarray]) -> list[LocalFeatures]:
        return [self._extract_one(image) for image in images_bgr]

    def _extract_one(self, image_bgr: np.ndarray) -> LocalFeatures:
        import cv2

        grey = image_bgr if image_bgr.ndim == 2 else cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        grey = resize_shorter_side(grey, self._features.image_size_px)
        h, w = grey.shape
        step, patch = self._features.rootsift_step_px, self._features.rootsift_patch_px
        keypoints, rows, cols = _grid(h, w, step, patch)
        _, sift = self._sift.compute(grey, keypoints)
        sift = np.asarray(sift, dtype=np.float32)
        root = np.sqrt(sift / np.maximum(sift.sum(axis=1, keepdims=True), 1e-12))
        return LocalFeatures(root.reshape(rows, cols, -1))


@lru_cache(maxsize=8)
def _grid(h: int, w: int, step: int, patch: int) -> tuple[tuple, int, int]:
    """Keypoints on a grid (centres at least patch/2 from the border), and the grid shape."""
    import cv2

    margin = patch / 2
    ys = np.arange(margin, h - margin + 1e-6, step)
    xs = np.arange(margin, w - margin + 1e-6, step)
    keypoints = tuple(cv2.KeyPoint(float(x), float(y), float(patch)) for y in ys for x in xs)
    return keypoints, len(ys), len(xs)
