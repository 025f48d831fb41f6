"""The ``consensus`` re-ranker: candidates near other strong candidates gain score."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from vlm_vpr.backends.rerank import Query
from vlm_vpr.backends.rerank.consensus import ConsensusReranker, consensus_scores
from vlm_vpr.core.config import LocalizerConfig, RerankConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.types import Candidate, Pose

QUERY = Query(np.zeros((4, 4, 3), np.uint8), np.zeros(4, np.float32), deadline_s=math.inf)


def make_candidates(scores: list[float], xs: list[float], ys: list[float] | None = None
                    ) -> list[Candidate]:
    ys = ys or [0.0] * len(xs)
    return [Candidate(i, f'img{i}', Pose(x, y), s, s) for i, (s, x, y) in
            enumerate(zip(scores, xs, ys))]


def reranker(sigma: float, weight: float) -> ConsensusReranker:
    return ConsensusReranker(LocalizerConfig(rerank=RerankConfig(
        consensus_sigma=sigma, consensus_weight=weight)))


def test_consensus_promotes_a_candidate_backed_by_a_close_neighbour() -> None:
    # Shifted scores (minus the weakest, 0.30): a 0.20, b 0.10, c 0.16, d 0.
    # b and c are 1 unit apart: kernel exp(-1 / 2) = 0.60653 with sigma 1; the rest are far.
    candidates = make_candidates([0.50, 0.40, 0.46, 0.30], [0.0, 10.0, 11.0, 50.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    expected = {0: 0.20, 1: 0.10 + 0.16 * 0.60653, 2: 0.16 + 0.10 * 0.60653, 3: 0.0}
    assert [c.map_index for c in ranked] == [2, 0, 1, 3]
    for c in ranked:
        assert c.score == pytest.approx(expected[c.map_index], abs=1e-5)
        assert c.evidence['consensus'] == pytest.approx(expected[c.map_index], abs=1e-5)


def test_consensus_uses_euclidean_distance_in_x_and_y() -> None:
    positions = np.array([[0.0, 0.0], [3.0, 4.0]])
    new = consensus_scores(np.array([1.0, 0.0]), positions, sigma=5.0, weight=2.0)
    # d = 5 = sigma: kernel exp(-1/2); candidate 1 gains 2 * 1.0 * exp(-0.5).
    np.testing.assert_allclose(new, [1.0, 2.0 * math.exp(-0.5)])


def test_consensus_with_a_narrow_kernel_keeps_the_incoming_order() -> None:
    candidates = make_candidates([0.5, 0.4, 0.46, 0.3], [0.0, 10.0, 11.0, 50.0])
    ranked = reranker(sigma=0.01, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [0, 2, 1, 3]


def test_consensus_ranks_by_the_incoming_score_not_the_coarse_score() -> None:
    candidates = make_candidates([0.5, 0.4, 0.3], [0.0, 20.0, 40.0])
    candidates[2].score = 0.9  # as if a previous re-ranker had promoted it
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [2, 0, 1]


def test_consensus_keeps_the_input_order_between_tied_scores() -> None:
    candidates = make_candidates([0.5, 0.5, 0.5], [0.0, 20.0, 40.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [0, 1, 2]


def test_consensus_returns_a_single_candidate_unchanged() -> None:
    candidates = make_candidates([0.7], [3.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert ranked == candidates and ranked[0].score == 0.7 and not ranked[0].evidence


@pytest.mark.parametrize(('fields', 'match'), [
    ({'consensus_sigma': 0.0}, 'consensus_sigma must be > 0'),
    ({'consensus_weight': -1.0}, 'consensus_weight must be >= 0'),
])
def test_rerank_config_rejects_invalid_consensus_settings(fields: dict[str, Any],
                                                           match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RerankConfig(**fields)
