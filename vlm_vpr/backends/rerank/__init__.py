"""Re-rankers: re-order the coarse shortlist. Chained in the order ``rerank.chain`` names them.

Per query the Localizer (1) calls ``select_submap`` on every re-ranker that has it (a
:class:`SubmapSelector`, e.g. ``region``) with the map ids searchable so far (the caller's
submap: eval's held-out range, a prior radius) and restricts the search to the returned ids,
(2) runs the coarse search, (3) calls ``rerank`` on each re-ranker in chain order, and
(4) copies ``query.notes`` into the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.types import Candidate

if TYPE_CHECKING:
    from vlm_vpr.backends.text_embedding import TextEmbedder
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap

VLM_RERANKERS = ('descriptions', 'pairwise', 'pointwise', 'region')
RERANKERS = (*VLM_RERANKERS, 'geometric', 'consensus')


@dataclass
class Query:
    """What a re-ranker may look at for one query image."""

    image_bgr: np.ndarray  # [H x W x 3] uint8
    global_descriptor: np.ndarray  # [D] float32, L2-normalised, same space as the map's
    deadline_s: float  # time.monotonic() value by which re-ranking should be done
    notes: list[str] = field(default_factory=list)  # diagnosed fallbacks, for the result
    scratch: dict[str, Any] = field(default_factory=dict)  # per-query state of re-rankers
    time_budget_s: float | None = None  # the budget deadline_s was set from (for messages)


class Reranker(Protocol):
    name: str

    def rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        """Candidates in their new order, ``score`` updated and raw scores in ``evidence``.

        Must not raise on a failing model: log, add a note, and return the input order.
        """
        ...


@runtime_checkable
class SubmapSelector(Protocol):
    def select_submap(
        self, query: Query, vpr_map: VprMap, submap: np.ndarray | None
    ) -> np.ndarray | None:
        """Map ids [S] int64 to search in, a non-empty subset of ``submap`` (the ids
        searchable so far; None = all), or None to leave the search as it is (also when
        unsure)."""
        ...


def create_rerankers(
    config: LocalizerConfig,
    vpr_map: VprMap,
    vlm_client: VlmClient | None = None,
    text_embedder: TextEmbedder | None = None,
) -> list[Reranker]:
    """The re-rankers ``config.rerank.chain`` names, in order.

    VLM re-rankers share one client (``vlm_client``, else the one ``config.vlm`` names);
    ``descriptions`` embeds with ``text_embedder``, else ``config.rerank.text_embedder``.
    """
    chain = config.rerank.chain
    unknown = [name for name in chain if name not in RERANKERS]
    if unknown:
        raise ConfigError(
            f'unknown re-ranker(s) {unknown} in rerank.chain; choose from {list(RERANKERS)}'
        )
    needs_vlm = [name for name in chain if name in VLM_RERANKERS]
    if needs_vlm and vlm_client is None and config.vlm.backend == 'none':
        raise ConfigError(
            f'rerank.chain names {needs_vlm}, which need a VLM: set '
            "vlm.backend to 'transformers' or 'openai' and vlm.model"
        )
    if 'descriptions' in chain and text_embedder is None:  # before the VLM, which loads longer
        from vlm_vpr.backends.text_embedding import TextEmbedder

        text_embedder = TextEmbedder(config.rerank.text_embedder)
    if needs_vlm and vlm_client is None:
        from vlm_vpr.backends.vlm import create_vlm_client

        vlm_client = create_vlm_client(config.vlm)
    rerankers: list[Reranker] = []
    for name in chain:
        if name in VLM_RERANKERS:
            assert vlm_client is not None  # made above for every chain with one
            rerankers.append(_vlm_reranker(name, config, vpr_map, vlm_client, text_embedder))
        elif name == 'geometric':
            from vlm_vpr.backends.rerank.geometric import GeometricReranker

            rerankers.append(GeometricReranker(config))
        else:
            from vlm_vpr.backends.rerank.consensus import ConsensusReranker

            rerankers.append(ConsensusReranker(config))
    return rerankers


def _vlm_reranker(
    name: str,
    config: LocalizerConfig,
    vpr_map: VprMap,
    vlm_client: VlmClient,
    text_embedder: TextEmbedder | None,
) -> Reranker:
    if name == 'descriptions':
        from vlm_vpr.backends.rerank.descriptions import DescriptionsReranker

        assert text_embedder is not None  # made by create_rerankers
        return DescriptionsReranker(config, vpr_map, vlm_client, text_embedder)
    if name == 'pairwise':
        from vlm_vpr.backends.rerank.pairwise import PairwiseReranker

        return PairwiseReranker(config, vpr_map, vlm_client)
    if name == 'pointwise':
        from vlm_vpr.backends.rerank.pointwise import PointwiseReranker

        return PointwiseReranker(config, vpr_map, vlm_client)
    from vlm_vpr.backends.rerank.region import RegionReranker

    return RegionReranker(config, vpr_map, vlm_client)
