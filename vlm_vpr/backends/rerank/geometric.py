"""Geometric verification: RootSIFT matches between the query and each map thumbnail + RANSAC."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Keypoints:
    xy: np.ndarray  # [N x 2] float32 pixel positions in the image resized to size_px
    desc: np.ndarray  # [N x 128] float32 RootSIFT, L2 norm 1
    size_px: int  # shorter side of the image they were detected in


def extract_rootsift(
    image_bgr: np.ndarray, size_px: int, max_keypoints: int, contrast_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The strongest SIFT keypoints of the image resized to shorter side ``size_px``.

    ``contrast_threshold`` is SIFT's (OpenCV default 0.04; lower finds more in dark images).
    Returns (xy [N x 2] float32 pixel positions in the resized image,
    desc [N x 128] float32 RootSIFT: L1-normalised then square-rooted, so L2 norm 1).
    """
    import cv2

    from vlm_vpr.core.images import resize_shorter_side

    grey = cv2.cvtColor(resize_shorter_side(image_bgr, size_px), cv2.COLOR_BGR2GRAY)
    keypoints, desc = cv2.SIFT.create(
        nfeatures=max_keypoints, contrastThreshold=contrast_threshold
    ).detectAndCompute(grey, None)
    if desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    xy = np.asarray(cv2.KeyPoint.convert(keypoints), np.float32).reshape(-1, 2)
    return xy, np.sqrt(desc).astype(np.float32)


def match_mutual_ratio(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float) -> np.ndarray:
    """Index pairs [M x 2] int64 of mutual nearest neighbours passing Lowe's ratio test.

    desc_a [Na x D], desc_b [Nb x D] float32, L2-normalised rows.
    """
    if len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros((0, 2), np.int64)
    sims = desc_a @ desc_b.T  # [Na x Nb] cosines; squared L2 distance = 2 - 2 cosine
    rows = np.arange(len(desc_a))
    nearest = sims.argmax(axis=1)
    best = sims[rows, nearest]
    # mutual: row i is also its match's best row (a max over axis 0 is fast, an argmax is not)
    mutual = best >= sims.max(axis=0)[nearest]
    sims[rows, nearest] = -np.inf
    second = sims.max(axis=1)
    keep = mutual & (2.0 - 2.0 * best < ratio**2 * (2.0 - 2.0 * second))
    return np.stack([rows[keep], nearest[keep]], axis=1)


def count_inliers(xy_a: np.ndarray, xy_b: np.ndarray, threshold_px: float) -> int:
    """How many matches (positions xy_a, xy_b [M x 2] float32) fit one fundamental matrix.

    MAGSAC++ with ``threshold_px`` epipolar distance; 0 below 8 matches (the minimal sample)
    and where OpenCV finds no model (it raises on some small degenerate sets).
    """
    import cv2

    if len(xy_a) < 8:
        return 0
    try:
        _, mask = cv2.findFundamentalMat(xy_a, xy_b, cv2.USAC_MAGSAC, threshold_px, 0.999, 2000)
    except cv2.error as exc:
        log.debug('no fundamental matrix for %d matches: %s', len(xy_a), exc)
        return 0
    return 0 if mask is None else int(mask.sum())


def inlier_bonus(inliers: int, half_inliers: float) -> float:
    """Saturating bonus n / (n + half) in [0, 1): 0.5 at ``half_inliers`` inliers."""
    return inliers / (inliers + half_inliers)


def verify(query: _Keypoints, candidate: _Keypoints, ratio: float, threshold_px: float) -> int:
    """RANSAC inliers among the mutual ratio-test matches of two keypoint sets."""
    pairs = match_mutual_ratio(query.desc, candidate.desc, ratio)
    return count_inliers(query.xy[pairs[:, 0]], candidate.xy[pairs[:, 1]], threshold_px)


class GeometricReranker:
    """Verify each candidate against the query with RootSIFT matches and RANSAC.

    score = incoming score + ``geometric_weight`` * n / (n + ``geometric_half_inliers``), with n
    the RANSAC inliers (``evidence['geometric_inliers']``). The query is resized to the
    thumbnails' scale. Candidates left when the query's deadline passes are not verified and
    keep their input order behind the verified ones. Map-side keypoints are cached (LRU over
    ``geometric_cache_size`` map images).
    """

    name = 'geometric'

    def __init__(self, config: LocalizerConfig) -> None:
        self.config = config.rerank
        self._cache: OrderedDict[tuple[str, int], _Keypoints] = OrderedDict()
        self._warned: set[str] = set()

    def rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        if not vpr_map.manifest.get('thumbnails'):
            self._note(
                query,
                f'geometric: map {vpr_map.path} has no thumbnails, kept '
                'the previous order; rebuild it with thumbnail_size_px > 0',
            )
            return candidates
        query_keypoints: dict[int, _Keypoints] = {}  # per thumbnail shorter side
        verified: list[Candidate] = []
        for candidate in candidates:
            if time.monotonic() >= query.deadline_s:
                query.notes.append(
                    f'geometric: time budget spent after {len(verified)} of '
                    f'{len(candidates)} candidates; the rest keep their order'
                )
                break
            inliers = 0
            map_keypoints = self._map_keypoints(vpr_map, candidate.map_index)
            if map_keypoints is None:
                self._note(
                    query,
                    f'geometric: thumbnail of map image '
                    f'{candidate.map_index} is unreadable (0 inliers); rebuild the map',
                )
            else:
                size_px = map_keypoints.size_px
                if size_px not in query_keypoints:
                    query_keypoints[size_px] = self._extract(query.image_bgr, size_px)
                inliers = verify(
                    query_keypoints[size_px],
                    map_keypoints,
                    self.config.geometric_ratio,
                    self.config.geometric_ransac_px,
                )
            candidate.evidence['geometric_inliers'] = float(inliers)
            candidate.score += self.config.geometric_weight * inlier_bonus(
                inliers, self.config.geometric_half_inliers
            )
            verified.append(candidate)
        verified.sort(key=lambda c: -c.score)
        return verified + candidates[len(verified) :]

    def _extract(self, image_bgr: np.ndarray, size_px: int) -> _Keypoints:
        xy, desc = extract_rootsift(
            image_bgr,
            size_px,
            self.config.geometric_max_keypoints,
            self.config.geometric_contrast_threshold,
        )
        return _Keypoints(xy, desc, size_px)

    def _map_keypoints(self, vpr_map: VprMap, map_index: int) -> _Keypoints | None:
        key = (str(vpr_map.path), map_index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        thumbnail = vpr_map.thumbnail(map_index)
        if thumbnail is None:
            return None
        keypoints = self._extract(thumbnail, min(thumbnail.shape[:2]))
        self._cache[key] = keypoints
        if len(self._cache) > self.config.geometric_cache_size:
            self._cache.popitem(last=False)
        return keypoints

    def _note(self, query: Query, message: str) -> None:
        """Add ``message`` to the query's notes; log it the first time only."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning('%s', message)
        query.notes.append(message)
