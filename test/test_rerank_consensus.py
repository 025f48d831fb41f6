"""The ``consensus`` re-ranker: candidates near other strong candidates gain score."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from vlm_vpr.backends.rerank import Query
from vlm_vpr.backends.rerank.consensus import (
    ConsensusReranker,
    consensus_scores,
    reorder_within_places,
)
from vlm_vpr.core.config import LocalizerConfig, RerankConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.types import Candidate, Pose

QUERY = Query(np.zeros((4, 4, 3), np.uint8), np.zeros(4, np.float32), deadline_s=math.inf)


def make_candidates(
    scores: list[float], xs: list[float], ys: list[float] | None = None
) -> list[Candidate]:
    ys = ys or [0.0] * len(xs)
    return [
        Candidate(i, f'img{i}', Pose(x, y), s, s)
        for i, (s, x, y) in enumerate(zip(scores, xs, ys))
    ]


def reranker(sigma: float, weight: float) -> ConsensusReranker:
    return ConsensusReranker(
        LocalizerConfig(rerank=RerankConfig(consensus_sigma=sigma, consensus_weight=weight))
    )


def test_consensus_moves_the_middle_of_a_cluster_of_good_candidates_first() -> None:
    # One place (all within 2 sigma = 4 of x=10) and a far one. Shifted scores (minus the
    # weakest, 0.30): 0.20, 0.18, 0.17, 0.16, 0. Kernel exp(-d^2 / 8): d=1 0.88250,
    # d=2 0.60653, d=3 0.32465, d=4 0.13534.
    candidates = make_candidates([0.50, 0.48, 0.47, 0.46, 0.30], [10.0, 12.0, 13.0, 14.0, 40.0])
    ranked = reranker(sigma=2.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    expected = {
        0: 0.20 + 0.18 * 0.60653 + 0.17 * 0.32465 + 0.16 * 0.13534,
        1: 0.18 + 0.20 * 0.60653 + 0.17 * 0.88250 + 0.16 * 0.60653,
        2: 0.17 + 0.20 * 0.32465 + 0.18 * 0.88250 + 0.16 * 0.88250,
        3: 0.16 + 0.20 * 0.13534 + 0.18 * 0.60653 + 0.17 * 0.88250,
        4: 0.0,
    }
    assert [c.map_index for c in ranked] == [1, 2, 3, 0, 4]
    for c in ranked:
        assert c.score == pytest.approx(expected[c.map_index], abs=1e-5)
        assert c.evidence['consensus'] == pytest.approx(expected[c.map_index], abs=1e-5)


def test_consensus_never_lets_a_dense_place_outvote_the_incoming_best_place() -> None:
    # Candidates 1 and 2 (x 11 and 10) back each other and out-score candidate 0 in support
    # (0.16 + 0.10 * exp(-1/2) = 0.2207 > 0.20), but 0 is another place (farther than 2 sigma).
    candidates = make_candidates([0.50, 0.46, 0.40, 0.30], [0.0, 11.0, 10.0, 50.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    assert ranked[1].score > ranked[0].score


def test_reorder_within_places_keeps_each_place_in_the_positions_it_held() -> None:
    positions = np.array([[0.0, 0.0], [30.0, 0.0], [2.0, 0.0], [31.0, 1.0], [4.0, 0.0]])
    support = np.array([1.0, 5.0, 2.0, 0.0, 3.0])
    # place of 0: {0, 2} (4 is 4 away from 0: outside radius 3); place of 1: {1, 3}; then {4}.
    # Positions 0 and 2 go to 2 then 0 (support 2 > 1); 1 and 3 stay (5 > 0).
    order = reorder_within_places(support, positions, radius=3.0)
    np.testing.assert_array_equal(order, [2, 1, 0, 3, 4])


def test_consensus_uses_euclidean_distance_in_x_and_y() -> None:
    positions = np.array([[0.0, 0.0], [3.0, 4.0]])
    new = consensus_scores(np.array([1.0, 0.0]), positions, sigma=5.0, weight=2.0)
    # d = 5 = sigma: kernel exp(-1/2); candidate 1 gains 2 * 1.0 * exp(-0.5).
    np.testing.assert_allclose(new, [1.0, 2.0 * math.exp(-0.5)])


def test_consensus_with_a_narrow_kernel_orders_by_the_incoming_score() -> None:
    # sigma 0.01: candidates 1 m apart give each other no support (exp(-5000)), so s' is the
    # shifted incoming score (minus the weakest, 0.30). A wide kernel (sigma 2) would move the
    # middle of the cluster first (see the first test); a narrow one keeps the best first.
    candidates = make_candidates([0.50, 0.48, 0.47, 0.46, 0.30], [10.0, 12.0, 13.0, 14.0, 40.0])
    ranked = reranker(sigma=0.01, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [0, 1, 2, 3, 4]
    assert [c.score for c in ranked] == pytest.approx([0.20, 0.18, 0.17, 0.16, 0.0], abs=1e-12)
    assert [c.evidence['consensus'] for c in ranked] == [c.score for c in ranked]
    # Out of score order within one place (1.5 sigma apart, kernel exp(-1.125) = 0.32465):
    # two candidates keep the order of their incoming scores, whatever the neighbour's support.
    candidates = make_candidates([0.40, 0.50, 0.30], [0.0, 0.015, 5.0])
    ranked = reranker(sigma=0.01, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert [c.map_index for c in ranked] == [1, 0, 2]
    expected = [0.20 + 0.10 * 0.32465, 0.10 + 0.20 * 0.32465, 0.0]
    assert [c.score for c in ranked] == pytest.approx(expected, abs=1e-5)


def test_consensus_weighs_neighbours_by_the_incoming_score_not_the_coarse_score() -> None:
    candidates = make_candidates([0.5, 0.4, 0.2], [0.0, 1.0, 40.0])
    candidates[1].score = 0.6  # as if a previous re-ranker had raised it
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    # shifted 0.3 and 0.4: s'_1 = 0.4 + 0.3 * 0.60653 > s'_0 = 0.3 + 0.4 * 0.60653
    assert [c.map_index for c in ranked] == [1, 0, 2]


def test_consensus_keeps_the_input_order_between_tied_scores() -> None:
    # Two places (within 2 sigma = 2 of 0 and of 40), each of two candidates whose s' tie:
    # 0.2 + 0.2 * exp(-1/2) for 0 and 1, 0 for 2 and 3 (the weakest, shifted to 0).
    candidates = make_candidates([0.5, 0.5, 0.3, 0.3], [0.0, 1.0, 40.0, 41.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert ranked[0].score == ranked[1].score and ranked[2].score == ranked[3].score
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    order = reorder_within_places(np.zeros(3), np.zeros((3, 2)), radius=1.0)  # one place
    np.testing.assert_array_equal(order, [0, 1, 2])


def test_consensus_returns_a_single_candidate_unchanged() -> None:
    candidates = make_candidates([0.7], [3.0])
    ranked = reranker(sigma=1.0, weight=1.0).rerank(QUERY, candidates, vpr_map=None)
    assert ranked == candidates and ranked[0].score == 0.7 and not ranked[0].evidence


@pytest.mark.parametrize(
    ('fields', 'match'),
    [
        ({'consensus_sigma': 0.0}, 'consensus_sigma must be > 0'),
        ({'consensus_weight': -1.0}, 'consensus_weight must be >= 0'),
    ],
)
def test_rerank_config_rejects_invalid_consensus_settings(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RerankConfig(**fields)
