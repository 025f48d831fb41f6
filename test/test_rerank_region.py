"""Map regions (k-means on positions, labels) and the ``region`` re-ranker that restricts the
search to the regions the VLM picks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_doubles import ScriptedVlm, colour_image, make_candidates, make_map

from vlm_vpr.backends.rerank import Query, SubmapSelector
from vlm_vpr.backends.rerank.region import RegionReranker
from vlm_vpr.backends.vlm import VlmUnavailableError
from vlm_vpr.core.config import LocalizerConfig, RerankConfig
from vlm_vpr.core.errors import ConfigError, MapError
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_describe import (
    REGION_OF_IMAGE_EXTRA,
    build_regions,
    cluster_positions,
    load_regions,
)
from vlm_vpr.core.map_format import read_map, write_extra

POSITIONS = [(0, 0), (1, 0), (2, 1), (100, 0), (101, 1), (102, 0), (200, 0), (201, 0)]
NAMES = ['west gate', 'central plaza', 'east car park']
QUERY_COLOUR = 15


@pytest.fixture()
def region_map(tmp_path: Path):
    vpr_map = make_map(tmp_path, POSITIONS)
    build_regions(vpr_map.path, 3, NAMES)
    return read_map(vpr_map.path)


def config(**rerank: Any) -> LocalizerConfig:
    return LocalizerConfig(rerank=RerankConfig(chain=('region',), **rerank))


def picking(regions: list[int], confident: bool = True) -> ScriptedVlm:
    return ScriptedVlm(lambda prompt, images: {'regions': regions, 'confident': confident})


def query_between(vpr_map, a: int, b: int) -> Query:
    """A query whose global descriptor is equally close to map images a and b (ambiguous)."""
    descriptors = vpr_map.content.descriptors.astype(np.float32)
    descriptor = descriptors[a] + descriptors[b]
    return Query(
        colour_image(QUERY_COLOUR),
        descriptor / np.linalg.norm(descriptor),
        time.monotonic() + 30.0,
    )


def test_cluster_positions_finds_separated_groups_numbered_in_route_order() -> None:
    region_of_image, centres = cluster_positions(np.array(POSITIONS, float), 3)
    assert region_of_image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert centres[1] == pytest.approx([101.0, 1 / 3])


def test_cluster_positions_never_makes_more_regions_than_distinct_positions() -> None:
    region_of_image, centres = cluster_positions(np.array([(0, 0), (0, 0), (5, 5)], float), 8)
    assert len(centres) == 2 and region_of_image.tolist() == [0, 0, 1]


@pytest.mark.parametrize('count', [0, -2])
def test_cluster_positions_rejects_a_count_below_one(count: int) -> None:
    with pytest.raises(ConfigError, match=f'region count must be >= 1, got {count}'):
        cluster_positions(np.array(POSITIONS, float), count)


def test_build_regions_stores_user_names_and_load_regions_reads_them(region_map) -> None:
    regions = load_regions(region_map)
    assert regions.labels == NAMES
    assert regions.region_of_image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert regions.centres_xy.shape == (3, 2)


def test_build_regions_rejects_a_wrong_number_of_names(tmp_path: Path) -> None:
    vpr_map = make_map(tmp_path, POSITIONS)
    with pytest.raises(ConfigError, match='2 region names given for 3 regions'):
        build_regions(vpr_map.path, 3, NAMES[:2])


def test_build_regions_rejects_repeated_names(tmp_path: Path) -> None:
    vpr_map = make_map(tmp_path, POSITIONS)
    with pytest.raises(ConfigError, match='region names must be distinct'):
        build_regions(vpr_map.path, 3, ['gate', 'plaza', 'gate'])
    assert load_regions(read_map(vpr_map.path)) is None


def test_build_regions_without_names_needs_map_descriptions(tmp_path: Path) -> None:
    vpr_map = make_map(tmp_path, POSITIONS)
    with pytest.raises(ConfigError, match='run `vlm-vpr map describe` first or give region names'):
        build_regions(vpr_map.path, 3)


def test_load_regions_rejects_regions_that_do_not_match_the_map(region_map) -> None:
    write_extra(region_map.path, REGION_OF_IMAGE_EXTRA, np.zeros(3, np.int32))
    with pytest.raises(MapError, match='do not match the map; run `vlm-vpr map regions`'):
        load_regions(read_map(region_map.path))


def test_region_reranker_needs_stored_regions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='no regions for the region re-ranker'):
        RegionReranker(config(), make_map(tmp_path, POSITIONS), picking([0]))


def test_select_submap_returns_the_picked_regions_and_rerank_orders_by_pick(region_map) -> None:
    vlm = picking([2, 1])
    reranker = RegionReranker(config(), region_map, vlm)
    assert isinstance(reranker, SubmapSelector)
    query = query_between(region_map, 3, 6)
    submap = reranker.select_submap(query, region_map, None)
    assert submap.tolist() == [3, 4, 5, 6, 7]
    prompt = vlm.calls[0][0]
    assert 'Region 0: "west gate"' in prompt and 'Region 2: "east car park"' in prompt
    candidates = make_candidates(region_map, [3, 6, 4, 7], [0.6, 0.59, 0.5, 0.4])
    ranked = reranker.rerank(query, candidates, region_map)
    assert [c.map_index for c in ranked] == [6, 7, 3, 4]
    assert [c.evidence['region'] for c in ranked] == [0.0, 0.0, 1.0, 1.0]
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)
    assert len(vlm.calls) == 1 and query.notes == []


def test_rerank_alone_asks_the_vlm_and_orders_other_regions_by_distance(region_map) -> None:
    vlm = picking([0])
    reranker = RegionReranker(config(), region_map, vlm)
    candidates = make_candidates(region_map, [7, 3, 1], [0.5, 0.49, 0.48])
    ranked = reranker.rerank(query_between(region_map, 7, 3), candidates, region_map)
    assert [c.map_index for c in ranked] == [1, 3, 7]
    assert len(vlm.calls) == 1


def test_select_submap_skips_the_vlm_when_the_coarse_match_is_clear(region_map) -> None:
    vlm = picking([2])
    reranker = RegionReranker(config(), region_map, vlm)
    descriptor = region_map.content.descriptors[4].astype(np.float32)
    query = Query(
        colour_image(QUERY_COLOUR),
        descriptor / np.linalg.norm(descriptor),
        time.monotonic() + 30.0,
    )
    assert reranker.select_submap(query, region_map, None) is None
    candidates = make_candidates(region_map, [4, 0], [0.99, 0.3])
    assert reranker.rerank(query, candidates, region_map) == candidates
    assert vlm.calls == [] and reranker.stats['skipped'] == 1


def test_select_submap_searches_the_whole_map_when_the_vlm_is_unsure(region_map) -> None:
    reranker = RegionReranker(config(), region_map, picking([1], confident=False))
    query = query_between(region_map, 3, 6)
    assert reranker.select_submap(query, region_map, None) is None
    assert 'not sure of the region' in query.notes[0]
    candidates = make_candidates(region_map, [6, 3], [0.5, 0.5])
    assert reranker.rerank(query, candidates, region_map) == candidates


def test_select_submap_falls_back_to_the_whole_map_when_the_vlm_fails(region_map) -> None:
    def fail(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        raise VlmUnavailableError('cannot reach http://127.0.0.1:1/v1')

    reranker = RegionReranker(config(), region_map, ScriptedVlm(fail))
    query = query_between(region_map, 3, 6)
    assert reranker.select_submap(query, region_map, None) is None
    assert 'region: VlmUnavailableError: cannot reach' in query.notes[0]
    assert reranker.stats['failures'] == 1


@pytest.mark.parametrize(('picks', 'expected'), [([2], [0, 1, 2, 3, 4, 5]), ([1, 2], [3, 4, 5])])
def test_region_picks_never_bring_back_map_images_the_caller_left_out(
    region_map, picks: list[int], expected: list[int]
) -> None:
    """The caller's submap (eval's held-out stretch, a prior radius) bounds the search: a pick
    outside it is ignored with a note, one that overlaps it narrows it."""
    localizer = Localizer(region_map, LocalizerConfig())  # no chain: built without a VLM
    localizer.config = config(vlm_always=True)
    localizer.rerankers = [RegionReranker(localizer.config, region_map, picking(picks))]
    query = query_between(region_map, 0, 1)
    searchable = np.arange(6)  # map images 6 and 7 (region 2) held out
    result = localizer._search_and_rerank(
        query.image_bgr, query.global_descriptor, {}, searchable, None, time.perf_counter()
    )
    assert sorted(c.map_index for c in result.candidates) == expected
    ignored = ['region: the picked regions hold no searchable map image; they are not used']
    assert result.notes == (ignored if picks == [2] else [])
    if picks == [2]:  # nor re-ranked towards the ignored region
        assert not any('region' in c.evidence for c in result.candidates)


def test_an_empty_submap_is_the_whole_map_for_the_region_pick_too(region_map) -> None:
    """`localize --near X Y` with no map image in the radius: the VLM still picks among the
    whole map's regions (the pick was skipped as 'clear' on an empty search, and the whole-map
    fallback came unordered)."""
    vlm = picking([2])
    localizer = Localizer(region_map, LocalizerConfig())  # no chain: built without a VLM
    localizer.config = config()
    localizer.rerankers = [RegionReranker(localizer.config, region_map, vlm)]
    query = query_between(region_map, 6, 7)
    empty = np.array([], dtype=np.int64)
    result = localizer._search_and_rerank(
        query.image_bgr, query.global_descriptor, {}, empty, None, time.perf_counter()
    )
    assert len(vlm.calls) == 1
    assert sorted(c.map_index for c in result.candidates) == [6, 7]
    assert result.notes == ['the requested submap holds no map image; searched the whole map']
