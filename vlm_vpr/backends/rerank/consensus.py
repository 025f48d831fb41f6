"""Distance-aware ranking: candidates near other strong candidates in the map gain score.

With s_j the incoming scores (``candidate.score``, whatever re-ranker set it) shifted so the
weakest candidate of the shortlist has 0, and d_ij the x, y distance between map poses:

    s'_i = s_i + w * sum_{j != i} s_j * exp(-d_ij^2 / (2 sigma^2))

sigma (``rerank.consensus_sigma``) is in map units: metres, or places for maps in ``frames``.
Needs no model; chain it after any re-ranker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.core.types import Candidate

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap


def consensus_scores(scores: np.ndarray, positions_xy: np.ndarray, sigma: float,
                     weight: float) -> np.ndarray:
    """s' [C] float64 for scores [C] and map positions [C x 2] (formula in the module doc)."""
    shifted = scores - scores.min()
    d2 = ((positions_xy[:, None, :] - positions_xy[None, :, :]) ** 2).sum(axis=-1)  # [C x C]
    kernel = np.exp(-d2 / (2.0 * sigma * sigma))
    np.fill_diagonal(kernel, 0.0)
    return shifted + weight * kernel @ shifted


class ConsensusReranker:
    name = 'consensus'

    def __init__(self, config: LocalizerConfig) -> None:
        self.sigma = config.rerank.consensus_sigma
        self.weight = config.rerank.consensus_weight

    def rerank(self, query: Query, candidates: list[Candidate],
               vpr_map: VprMap) -> list[Candidate]:
        """Candidates by s' descending (ties keep input order); ``evidence['consensus']`` = s'."""
        if len(candidates) < 2:
            return candidates
        scores = np.array([c.score for c in candidates], dtype=np.float64)
        positions_xy = np.array([[c.pose.x, c.pose.y] for c in candidates], dtype=np.float64)
        new_scores = consensus_scores(scores, positions_xy, self.sigma, self.weight)
        for candidate, score in zip(candidates, new_scores):
            candidate.evidence[self.name] = float(score)
            candidate.score = float(score)
        return [candidates[i] for i in np.argsort(-new_scores, kind='stable')]
