"""The Localizer: one image in, a pose prior out. Every entry point (CLI, node, eval) uses it."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from vlm_vpr.core.confidence import Calibration, collect_evidence
from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.errors import NoFeaturesError
from vlm_vpr.core.images import as_bgr
from vlm_vpr.core.map_format import VprMap, project_descriptor, read_map
from vlm_vpr.core.pose_fusion import fuse_poses
from vlm_vpr.core.retrieval import search
from vlm_vpr.core.threads import limit_threads
from vlm_vpr.core.types import Candidate, LocalizationResult
from vlm_vpr.core.vlad import aggregate_vlad

log = logging.getLogger(__name__)


class Localizer:
    """Extract -> aggregate -> search -> re-rank -> fuse, against one map."""

    def __init__(
        self,
        vpr_map: VprMap,
        config: LocalizerConfig | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        """``calibration``: the confidence model; default: the map's for ``config``'s settings
        (:meth:`Calibration.from_map`)."""
        from vlm_vpr.backends.features import create_extractor

        self.map = vpr_map
        self.config = config or LocalizerConfig()
        self.extractor = create_extractor(vpr_map.build_config.features, self.config.runtime)
        self.rerankers = self._create_rerankers()
        # after everything that may import torch (a DINOv2 extractor, a VLM, Sentence-BERT)
        limit_threads(self.config.runtime.num_threads, blas_threads=1)
        self.calibration = (
            Calibration.from_map(vpr_map, self.config) if calibration is None else calibration
        )

    @functools.cached_property
    def descriptors_float32(self) -> np.ndarray:
        """[N x D] float32 copy of the map descriptors, made once and shared by the sequence
        matchers (one per camera in the node)."""
        return self.map.content.descriptors.astype(np.float32)

    @classmethod
    def from_map_path(
        cls, map_dir: str | Path, config: LocalizerConfig | None = None
    ) -> Localizer:
        return cls(read_map(map_dir), config)

    def describe(self, image_bgr: np.ndarray) -> np.ndarray:
        """Global descriptor [D] float32 (L2-normalised) of one image, in the map's space."""
        return self._aggregate(self.extractor.extract([as_bgr(image_bgr)])[0].flat, {})

    def localize(
        self,
        image_bgr: np.ndarray,
        submap: np.ndarray | None = None,
        time_budget_s: float | None = None,
    ) -> LocalizationResult:
        """Localise one [H x W x 3] uint8 BGR image (grey and BGRA accepted).

        ``submap`` (map ids) restricts the search, e.g. to a radius around a prior position.
        Raises ImageError for unusable images (NoFeaturesError for one without a usable local
        feature); re-ranker failures only add notes.
        """
        result = self.localize_batch([image_bgr], submap, time_budget_s)[0]
        if isinstance(result, NoFeaturesError):
            raise result
        return result

    def localize_batch(
        self,
        images_bgr: list[np.ndarray],
        submap: np.ndarray | None = None,
        time_budget_s: float | None = None,
    ) -> list[LocalizationResult | NoFeaturesError]:
        """Localise several images (one per camera, say) with one batched feature extraction
        (up to ``runtime.batch_size`` images of one size per forward pass); the rest runs per
        image, as in :meth:`localize`. Each result's ``extract`` time is the whole batch's,
        the time its image waited for it. An image without a usable local feature gets its
        NoFeaturesError in its place, so the others' extraction is not lost (a lens cap on
        one camera of several); other ImageErrors (an image that is not one) raise."""
        start = time.perf_counter()
        images = [as_bgr(image) for image in images_bgr]
        local = self.extractor.extract(images)
        extract_ms = _ms(start)
        results: list[LocalizationResult | NoFeaturesError] = []
        for image, features in zip(images, local):
            if len(features.flat) == 0:  # its descriptor would be 0: every map image ties
                results.append(
                    NoFeaturesError(
                        f'image of {image.shape[1]}x{image.shape[0]} has no usable local '
                        'feature (blank, dark or textureless: a lens cap, darkness, a wall '
                        'filling the view)'
                    )
                )
                continue
            timing = {'extract': extract_ms}
            descriptor = self._aggregate(features.flat, timing)
            results.append(
                self._search_and_rerank(image, descriptor, timing, submap, time_budget_s, start)
            )
        return results

    def _search_and_rerank(
        self,
        image: np.ndarray,
        descriptor: np.ndarray,
        timing: dict[str, float],
        submap: np.ndarray | None,
        time_budget_s: float | None,
        start: float,
    ) -> LocalizationResult:
        from vlm_vpr.backends.rerank import Query

        budget = self.config.rerank.time_budget_s if time_budget_s is None else time_budget_s
        query = Query(image, descriptor, time.monotonic() + budget, time_budget_s=budget)

        t = time.perf_counter()
        if submap is not None and len(submap) == 0:  # before the selectors: they search it too
            query.notes.append('the requested submap holds no map image; searched the whole map')
            submap = None
        for reranker in self.rerankers:
            select = getattr(reranker, 'select_submap', None)
            chosen = select(query, self.map, submap) if select is not None else None
            if chosen is not None:
                submap = chosen
        depth = max(self.config.top_k, self.config.rerank.shortlist_k if self.rerankers else 0)
        scores, ids = search(
            self.map.index, self.map.content.descriptors, descriptor, depth, submap
        )
        candidates = [self._candidate(int(i), float(s)) for s, i in zip(scores, ids)]
        timing['search'] = _ms(t)

        coarse = list(candidates)
        if self.rerankers:
            t = time.perf_counter()
            for reranker in self.rerankers:
                candidates = reranker.rerank(query, candidates, self.map)
            timing['rerank'] = _ms(t)

        t = time.perf_counter()
        candidates = candidates[: self.config.top_k]
        pose, covariance = fuse_poses(candidates, self.config.fusion)
        evidence = collect_evidence(coarse, candidates, self.config.fusion)
        confidence = self.calibration.confidence(evidence)
        timing['fuse'] = _ms(t)
        timing['total'] = _ms(start)
        return LocalizationResult(
            candidates, pose, covariance, confidence, timing, query.notes, evidence, descriptor
        )

    def _aggregate(self, local: np.ndarray, timing: dict[str, float]) -> np.ndarray:
        """Global descriptor [D] of local features [M x D_local]: VLAD, then the map's PCA."""
        t = time.perf_counter()
        vlad = aggregate_vlad(local, self.map.content.codebook, self.map.build_config.vlad)
        descriptor = project_descriptor(vlad, self.map).reshape(-1)
        timing['aggregate'] = _ms(t)
        return descriptor

    def _candidate(self, map_index: int, score: float) -> Candidate:
        content = self.map.content
        return Candidate(
            map_index, content.image_names[map_index], content.poses[map_index], score, score
        )

    def _create_rerankers(self) -> list:
        if not self.config.rerank.chain:
            return []
        from vlm_vpr.backends.rerank import create_rerankers

        return create_rerankers(self.config, self.map)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0
