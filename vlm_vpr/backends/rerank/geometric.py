"""Geometric verification: RootSIFT matches between the query and each map thumbnail + RANSAC."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.backends.rerank import Query
from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.types import Candidate

if TYPE_CHECKING:
    from vlm_vpr.core.map_format import VprMap

log = logging.getLogger(__name__)


def extract_rootsift(image_bgr: np.ndarray, size_px: int,
                     max_keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints of the image resized to shorter side ``size_px``.

    Returns (xy [N x 2] float32 pixel positions in the resized image,
    desc [N x 128] float32 RootSIFT: L1-normalised then square-rooted, so L2 norm 1).
    """
    import cv2

    from vlm_vpr.core.images import resize_shorter_side

    grey = cv2.cvtColor(resize_shorter_side(image_bgr, size_px), cv2.COLOR_BGR2GRAY)
    keypoints, desc = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(grey, None)
    if desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    return cv2.KeyPoint_convert(keypoints).reshape(-1, 2), np.sqrt(desc).astype(np.float32)


def match_mutual_ratio(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float) -> np.ndarray:
    """Index pairs [M x 2] int64 of mutual nearest neighbours passing Lowe's ratio test.

    desc_a [Na x D], desc_b [Nb x D] float32, L2-normalised rows.
    """
    if len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros((0, 2), np.int64)
    dist2 = np.maximum(2.0 - 2.0 * (desc_a @ desc_b.T), 0.0)  # [Na x Nb] squared L2
    best_two = np.partition(dist2, 1, axis=1)[:, :2]
    nearest = dist2.argmin(axis=1)
    rows = np.arange(len(desc_a))
    keep = (dist2.argmin(axis=0)[nearest] == rows) & (best_two[:, 0] < ratio**2 * best_two[:, 1])
    return np.stack([rows[keep], nearest[keep]], axis=1)


def count_inliers(xy_a: np.ndarray, xy_b: np.ndarray, threshold_px: float) -> int:
    """Matches [M x 2] consistent with one fundamental matrix (MAGSAC++); 0 below 8 matches."""
    import cv2

    if len(xy_a) < 8:
        return 0
    _, mask = cv2.findFundamentalMat(xy_a, xy_b, cv2.USAC_MAGSAC, threshold_px, 0.999, 2000)
    return 0 if mask is None else int(mask.sum())
