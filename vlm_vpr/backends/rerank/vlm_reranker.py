"""What every VLM re-ranker shares: the ambiguity gate, the time budget, falling back to the
input order on any VlmError, counters, and scores that never increase down the list."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from vlm_vpr.backends.vlm import VlmTimeoutError
from vlm_vpr.core.errors import ConfigError, VlmError

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate

log = logging.getLogger(__name__)

T = TypeVar('T')


class VlmReranker:
    """Base of the VLM re-rankers; subclasses set ``name`` and implement ``_rerank``.

    ``stats`` counts per instance: 'queries', 'skipped' (coarse result not ambiguous),
    'vlm_calls', 'failures' (query fell back to the input order).
    """

    name = ''

    def __init__(self, config: LocalizerConfig, client: VlmClient) -> None:
        self.config = config.rerank
        self.client = client
        self.stats: Counter[str] = Counter()

    def rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        self.stats['queries'] += 1
        if len(candidates) < 2 or not self.needs_vlm(coarse_margin(candidates)):
            self.stats['skipped'] += 1
            return candidates
        try:
            return self._rerank(query, candidates, vpr_map)
        except VlmError as exc:
            self.note_failure(query, exc)
            return candidates

    def _rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        raise NotImplementedError

    def needs_vlm(self, margin: float) -> bool:
        """True when the VLM should be asked: always-on, or coarse top-1/top-2 margin small."""
        return self.config.vlm_always or margin < self.config.vlm_margin_threshold

    def ask(self, task: Callable[..., T], query: Query, *args: Any) -> T:
        """``task(client, *args, timeout_s=...)`` within the query's remaining time budget."""
        remaining_s = query.deadline_s - time.monotonic()
        if remaining_s <= 0:
            budget_s = query.time_budget_s
            if budget_s is None:
                budget_s = self.config.time_budget_s
            raise VlmTimeoutError(f'the re-ranking time budget ({budget_s:g} s) is spent')
        self.stats['vlm_calls'] += 1
        return task(self.client, *args, timeout_s=remaining_s)

    def note_failure(self, query: Query, exc: VlmError) -> None:
        self.stats['failures'] += 1
        message = f'{self.name}: {type(exc).__name__}: {exc}; kept the previous order'
        log.warning('%s', message)
        query.notes.append(message)

    def reorder(
        self,
        candidates: list[Candidate],
        order: list[int],
        raw_scores: dict[int, float],
        unscored: float = 0.0,
    ) -> list[Candidate]:
        """``candidates`` in ``order`` with evidence[name] = raw score (where known) and
        ``score`` = running minimum of the raw scores (``unscored`` where unknown), so scores
        never increase down the list and a chained re-ranker sees a consistent order."""
        ranked = [candidates[i] for i in order]
        running = math.inf
        for i, candidate in zip(order, ranked):
            raw = raw_scores.get(i, unscored)
            if i in raw_scores:
                candidate.evidence[self.name] = raw
            running = min(running, raw)
            candidate.score = running
        return ranked


def coarse_margin(candidates: list[Candidate]) -> float:
    """Top-1 minus top-2 coarse score (inf for fewer than two candidates)."""
    if len(candidates) < 2:
        return math.inf
    top = np.sort([c.coarse_score for c in candidates])[::-1]
    return float(top[0] - top[1])


def require_thumbnails(vpr_map: VprMap, name: str) -> None:
    """ConfigError unless the map stores thumbnails (the VLM re-rankers look at them)."""
    if not vpr_map.manifest.get('thumbnails'):
        raise ConfigError(
            f're-ranker {name!r} needs map thumbnails; rebuild the map with thumbnail_size_px > 0'
        )


def candidate_image(vpr_map: VprMap, candidate: Candidate) -> np.ndarray:
    """The candidate's thumbnail [H x W x 3] uint8 BGR; VlmError if it cannot be read."""
    image = vpr_map.thumbnail(candidate.map_index)
    if image is None:
        raise VlmError(
            f'thumbnail of map image {candidate.map_index} is missing or unreadable; '
            'rebuild the map'
        )
    return image
