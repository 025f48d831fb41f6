"""``region`` re-ranker: the VLM picks the likely region(s) of the map for the query, retrieval is
restricted to them, and candidates are ordered by region.

Regions are k-means clusters of the map positions with a short label each, stored in the map by
`vlm-vpr map regions` (labels from the map descriptions or given by the user). Before the
search, :meth:`RegionReranker.select_submap` asks the VLM (only when the top-1/top-2 margin
within the searchable map ids is small, unless ``rerank.vlm_always``) and returns the picked
regions' map ids among them; an unsure answer, a failure or picks wholly outside them leave the
search as it was (the caller's submap, else the whole map). ``rerank`` then puts candidates of
the first pick first, then the next pick's, then the others by distance to the nearest picked
region.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.backends.rerank.vlm_reranker import VlmReranker, coarse_margin
from vlm_vpr.backends.vlm.tasks import pick_regions
from vlm_vpr.core.errors import ConfigError, VlmError
from vlm_vpr.core.map_describe import load_regions
from vlm_vpr.core.retrieval import search

if TYPE_CHECKING:
    from vlm_vpr.backends.rerank import Query
    from vlm_vpr.backends.vlm import VlmClient
    from vlm_vpr.core.config import LocalizerConfig
    from vlm_vpr.core.map_format import VprMap
    from vlm_vpr.core.types import Candidate


class RegionReranker(VlmReranker):
    name = 'region'

    def __init__(self, config: LocalizerConfig, vpr_map: VprMap, client: VlmClient) -> None:
        super().__init__(config, client)
        regions = load_regions(vpr_map)
        if regions is None:
            raise ConfigError(
                f'map {vpr_map.path} has no regions for the region re-ranker; run '
                '`vlm-vpr map regions` (after `vlm-vpr map describe`, or with '
                '--names)'
            )
        self.regions = regions

    def select_submap(
        self, query: Query, vpr_map: VprMap, submap: np.ndarray | None
    ) -> np.ndarray | None:
        """Map ids [S] int64 of the picked regions within ``submap`` (None = the whole map),
        or None: search ``submap`` as it is (no pick, or no searchable image in the picks)."""
        self.stats['queries'] += 1
        scores, _ = search(
            vpr_map.index, vpr_map.content.descriptors, query.global_descriptor, 2, submap
        )
        margin = float(scores[0] - scores[1]) if len(scores) > 1 else math.inf
        picks = self._pick(query, margin)
        if picks is None:
            return None
        picked = np.flatnonzero(np.isin(self.regions.region_of_image, picks)).astype(np.int64)
        if submap is not None:
            picked = np.intersect1d(picked, submap)
        if len(picked) == 0:  # the picks lie outside what may be searched: ignore them
            query.scratch[self.name] = None
            query.notes.append(
                'region: the picked regions hold no searchable map image; they are not used'
            )
            return None
        return picked

    def rerank(
        self, query: Query, candidates: list[Candidate], vpr_map: VprMap
    ) -> list[Candidate]:
        if self.name not in query.scratch:  # select_submap was not called for this query
            self.stats['queries'] += 1
            self._pick(query, coarse_margin(candidates))
        picks = query.scratch[self.name]
        if picks is None or not candidates:
            return candidates
        rank_of_region = {region: rank for rank, region in enumerate(picks)}
        centres = self.regions.centres_xy[picks]  # [P x 2]
        keys = []
        for i, c in enumerate(candidates):
            region = int(self.regions.region_of_image[c.map_index])
            distance_m = float(np.linalg.norm(centres - (c.pose.x, c.pose.y), axis=1).min())
            rank = rank_of_region.get(region, len(picks))
            keys.append((rank, distance_m if rank == len(picks) else 0.0, i))
        order = [i for *_, i in sorted(keys)]
        running = math.inf  # incoming scores, made non-increasing in the new order
        for i in order:
            candidates[i].evidence[self.name] = float(keys[i][0])  # pick rank; len(picks) = none
            running = min(running, candidates[i].score)
            candidates[i].score = running
        return [candidates[i] for i in order]

    def _pick(self, query: Query, margin: float) -> list[int] | None:
        """Ask the VLM for regions (if the margin calls for it); stores the answer in scratch."""
        picks = None
        if self.needs_vlm(margin):
            try:
                picks = self.ask(
                    pick_regions,
                    query,
                    query.image_bgr,
                    self.regions.labels,
                    self.config.region_max_picks,
                )
            except VlmError as exc:
                self.note_failure(query, exc)
            else:
                if picks is None:
                    self.stats['unsure'] += 1
                    query.notes.append(
                        'region: the VLM is not sure of the region; the search is not narrowed'
                    )
        else:
            self.stats['skipped'] += 1
        query.scratch[self.name] = picks
        return picks
