"""``pairwise`` re-ranker: the VLM sees the query and two candidates and says which one shows
the same place; a round-robin tournament over the top candidates decides their order.

Each pair is asked in both orders (A, B) and (B, A): a model that always prefers the first (or
second) image gives each side one vote, so position bias cancels instead of deciding. The
tournament size n is the largest n <= ``rerank.pairwise_top_n`` with n * (n - 1) <=
``rerank.max_vlm_calls``; candidates below the top n keep their order behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.backends.rerank.vlm_reranker import VlmReranker, candidate_image, require_thumbnails
from vlm_vpr.backends.vlm.tasks import compare_pair

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate


def tournament_size(num_candidates: int, top_n: int, max_calls: int) -> int:
    """Players of a round robin asking every pair in both orders within ``max_calls`` calls."""
    n = min(num_candidates, top_n)
    while n > 1 and n * (n - 1) > max_calls:
        n -= 1
    return n


def tournament_votes(n: int, judge: Callable[[int, int], str]) -> np.ndarray:
    """Votes [n] float64 of a round robin; ``judge(i, j)`` shows player i as A and j as B and
    answers 'A', 'B' or 'none'. Each pair is judged twice, so a player gets 0-2 votes per pair."""
    votes = np.zeros(n)
    for i in range(n):
        for j in range(i + 1, n):
            forward, backward = judge(i, j), judge(j, i)
            votes[i] += (forward == 'A') + (backward == 'B')
            votes[j] += (forward == 'B') + (backward == 'A')
    return votes


class PairwiseReranker(VlmReranker):
    name = 'pairwise'

    def __init__(self, config: LocalizerConfig, vpr_map: VprMap, client: VlmClient) -> None:
        super().__init__(config, client)
        require_thumbnails(vpr_map, self.name)

    def _rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        n = tournament_size(len(candidates), self.config.pairwise_top_n, self.config.max_vlm_calls)
        if n < 2:
            return candidates
        images = [candidate_image(vpr_map, c) for c in candidates[:n]]
        votes = tournament_votes(
            n, lambda i, j: self.ask(compare_pair, query, query.image_bgr, images[i], images[j])
        )
        win_fraction = votes / (2 * (n - 1))  # in [0, 1]
        top = np.argsort(-win_fraction, kind='stable')
        order = [int(i) for i in top] + list(range(n, len(candidates)))
        return self.reorder(candidates, order, {i: float(win_fraction[i]) for i in range(n)})
