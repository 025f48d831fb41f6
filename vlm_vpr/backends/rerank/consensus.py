"""Distance-aware ranking: within a place, the candidate best backed by its neighbours leads.

With s_j the incoming scores (``candidate.score``, whatever re-ranker set it) shifted so the
weakest candidate of the shortlist has 0, and d_ij the x, y distance between map poses:

    s'_i = s_i + w * sum_{j != i} s_j * exp(-d_ij^2 / (2 sigma^2))

Candidates are grouped into places: the best remaining candidate (incoming order) takes every
ungrouped candidate within 2 sigma of it. Each place keeps the list positions it held, and its
candidates fill them in order of s'. So neighbours' support moves a place's first slot to the
middle of its cluster of good candidates (the incoming best is often a neighbouring frame just
outside the tolerance), but a dense cluster elsewhere never outvotes the place the previous
stage chose: wrong places often retrieve as many close neighbours as the right one, and
sorting the whole shortlist by s' lowered Recall@1 on the corridor and Gardens Point
night_vs_day_right data.

sigma (``rerank.consensus_sigma``) is in map units: metres, or places for maps in ``frames``.
Needs no model; chain it after any re-ranker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate


def consensus_scores(
    scores: np.ndarray, positions_xy: np.ndarray, sigma: float, weight: float
) -> np.ndarray:
    """s' [C] float64 for scores [C] and map positions [C x 2] (formula in the module doc)."""
    shifted = scores - scores.min()
    d2 = ((positions_xy[:, None, :] - positions_xy[None, :, :]) ** 2).sum(axis=-1)  # [C x C]
    kernel = np.exp(-d2 / (2.0 * sigma * sigma))
    np.fill_diagonal(kernel, 0.0)
    return shifted + weight * kernel @ shifted


def reorder_within_places(
    support: np.ndarray, positions_xy: np.ndarray, radius: float
) -> np.ndarray:
    """Indices [C]: each place keeps the list positions its candidates hold, filled with them
    by ``support`` [C] descending (ties keep input order). A place is the first ungrouped
    candidate and every ungrouped one within ``radius`` of it, in input order."""
    order = np.arange(len(support))
    ungrouped = np.ones(len(support), bool)
    for anchor in range(len(support)):
        if not ungrouped[anchor]:
            continue
        near = np.hypot(*(positions_xy - positions_xy[anchor]).T) <= radius
        members = np.flatnonzero(near & ungrouped)
        ungrouped[members] = False
        order[members] = members[np.argsort(-support[members], kind='stable')]
    return order


class ConsensusReranker:
    name = 'consensus'

    def __init__(self, config: LocalizerConfig) -> None:
        self.sigma = config.rerank.consensus_sigma
        self.weight = config.rerank.consensus_weight

    def rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        """Candidates re-ordered within their places; ``score`` and ``evidence['consensus']``
        = s' (so scores fall within a place, not necessarily across places).

        The input is taken in its given order (best first, as every stage returns it).
        """
        if len(candidates) < 2:
            return candidates
        scores = np.array([c.score for c in candidates], dtype=np.float64)
        positions_xy = np.array([[c.pose.x, c.pose.y] for c in candidates], dtype=np.float64)
        support = consensus_scores(scores, positions_xy, self.sigma, self.weight)
        for candidate, value in zip(candidates, support):
            candidate.evidence[self.name] = float(value)
            candidate.score = float(value)
        order = reorder_within_places(support, positions_xy, 2.0 * self.sigma)
        return [candidates[i] for i in order]
