"""``pointwise`` re-ranker: the VLM rates each candidate alone, 0-10, against the query.

A baseline for comparison, and the weak strategy: a lone rating has no reference point, small
VLMs rate most outdoor pairs alike, and one call per candidate is slow. Prefer
``descriptions`` (one call per query) or ``pairwise`` (relative judgements, bias-cancelled).
At most ``rerank.max_vlm_calls`` candidates are rated; the others keep their order behind them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.backends.rerank.vlm_reranker import VlmReranker, candidate_image, require_thumbnails
from vlm_vpr.backends.vlm.tasks import score_candidate

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate


class PointwiseReranker(VlmReranker):
    name = 'pointwise'

    def __init__(self, config: LocalizerConfig, vpr_map: VprMap, client: VlmClient) -> None:
        super().__init__(config, client)
        require_thumbnails(vpr_map, self.name)

    def _rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        rated = candidates[: self.config.max_vlm_calls]
        ratings = np.array(
            [
                self.ask(score_candidate, query, query.image_bgr, candidate_image(vpr_map, c))
                / 10.0
                for c in rated
            ]
        )
        order = [int(i) for i in np.argsort(-ratings, kind='stable')]
        order += list(range(len(rated), len(candidates)))
        return self.reorder(candidates, order, {i: float(r) for i, r in enumerate(ratings)})
