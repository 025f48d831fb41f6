"""``descriptions`` re-ranker (InternVL-VPR): compare VLM scene descriptions of the query with
the map's, in Sentence-BERT space.

The VLM gives N weighted descriptions of the query, a_i(q) summing to 1, embedded as e_i(q).
A candidate j with descriptions embedded as e_l(j) scores

    S(q, j) = sum_i a_i(q) * max_l cos(e_i(q), e_l(j))

Candidates with S > tau come first, by S; the others (and candidates without descriptions)
keep their input order behind them. With map-side descriptions (`vlm-vpr map describe`) a query
costs one VLM call; without them every candidate thumbnail is described online (K + 1 calls).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.backends.rerank.vlm_reranker import VlmReranker, candidate_image, require_thumbnails
from vlm_vpr.backends.vlm.tasks import describe_image
from vlm_vpr.core.errors import ConfigError, VlmOutputError
from vlm_vpr.core.map_describe import load_map_descriptions

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.backends.text_embedding import TextEmbedder
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate

log = logging.getLogger(__name__)


def description_scores(
    query_weights: np.ndarray,
    query_embeddings: np.ndarray,
    map_embeddings: np.ndarray,
    map_owners: np.ndarray,
    candidate_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(S [C] float32, described [C] bool) for candidates ``candidate_ids`` [C] (map ids).

    query_weights [Q] summing to 1; query_embeddings [Q x E] and map_embeddings [M x E]
    float32, L2-normalised; map_owners [M] int, map id of each map row, ascending.
    A candidate without map rows is not described and scores 0.
    """
    starts = np.searchsorted(map_owners, candidate_ids, side='left')
    ends = np.searchsorted(map_owners, candidate_ids, side='right')
    scores = np.zeros(len(candidate_ids), np.float32)
    for c, (start, end) in enumerate(zip(starts, ends)):
        if end > start:  # the candidate's rows only, not the map's
            cosines = query_embeddings @ map_embeddings[start:end].T  # [Q x rows]
            scores[c] = query_weights @ cosines.max(axis=1)
    return scores, ends > starts


def order_by_description_scores(
    scores: np.ndarray, described: np.ndarray, tau: float
) -> list[int]:
    """Indices: described candidates with S > tau by S descending (ties keep input order),
    then all others in input order."""
    above = np.flatnonzero(described & (scores > tau))
    above = above[np.argsort(-scores[above], kind='stable')]
    below = np.setdiff1d(np.arange(len(scores)), above)
    return [int(i) for i in (*above, *below)]


class DescriptionsReranker(VlmReranker):
    name = 'descriptions'

    def __init__(
        self, config: LocalizerConfig, vpr_map: VprMap, client: VlmClient, embedder: TextEmbedder
    ) -> None:
        super().__init__(config, client)
        self.embedder = embedder
        self.map_descriptions = load_map_descriptions(vpr_map)
        if self.map_descriptions is None:
            require_thumbnails(vpr_map, self.name)
            log.warning(
                'map %s has no descriptions: each query describes all its candidates '
                'online (K + 1 VLM calls); run `vlm-vpr map describe` once instead',
                vpr_map.path,
            )
        elif self.map_descriptions.text_embedder != embedder.model_name:
            raise ConfigError(
                f'map descriptions of {vpr_map.path} were embedded with '
                f'{self.map_descriptions.text_embedder!r} but rerank.text_embedder is '
                f'{embedder.model_name!r}; use the same model or run `vlm-vpr map describe` again'
            )

    def _rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        n = self.config.num_descriptions
        described = self.ask(describe_image, query, query.image_bgr, n)
        if not described:
            raise VlmOutputError('the VLM gave no usable description of the query')
        query_weights = np.array([d.weight for d in described], np.float32)
        query_embeddings = self.embedder.embed([d.text for d in described])
        ids = np.array([c.map_index for c in candidates], np.int64)
        if self.map_descriptions is not None:
            map_embeddings = self.map_descriptions.embeddings
            owners = self.map_descriptions.owners
        else:
            texts: list[str] = []
            owner_list: list[int] = []
            for candidate in sorted(candidates, key=lambda c: c.map_index):
                for d in self.ask(describe_image, query, candidate_image(vpr_map, candidate), n):
                    texts.append(d.text)
                    owner_list.append(candidate.map_index)
            map_embeddings = self.embedder.embed(texts)
            owners = np.array(owner_list, np.int64)
        scores, has_rows = description_scores(
            query_weights, query_embeddings, map_embeddings, owners, ids
        )
        order = order_by_description_scores(scores, has_rows, self.config.tau)
        return self.reorder(candidates, order, {i: float(s) for i, s in enumerate(scores)})
