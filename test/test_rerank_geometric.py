"""The ``geometric`` re-ranker: RootSIFT matching + RANSAC against the map thumbnails."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

from vlm_vpr.backends.rerank import Query, geometric
from vlm_vpr.backends.rerank.geometric import (
    GeometricReranker,
    count_inliers,
    match_mutual_ratio,
)
from vlm_vpr.core.config import LocalizerConfig, MapBuildConfig, RerankConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.map_build import encode_thumbnail
from vlm_vpr.core.map_format import MapContent, VprMap, read_map, write_map
from vlm_vpr.core.types import Candidate, Pose
from vlm_vpr.core.vlad import l2_normalize


def texture(seed: int, height: int = 480, width: int = 640) -> np.ndarray:
    """A synthetic BGR scene of random filled shapes: rich in SIFT keypoints."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128, np.uint8)
    for _ in range(250):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, [width, height]))
        size = int(rng.integers(5, 40))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), size, color, -1)
        else:
            cv2.rectangle(image, (x, y), (x + size, y + int(rng.integers(5, 40))), color, -1)
    return cv2.GaussianBlur(image, (3, 3), 0)


def warp(image: np.ndarray) -> np.ndarray:
    """The image seen from a moved camera: rotation, scale and perspective (a homography)."""
    h, w = image.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    moved = np.float32([[30, 20], [w - 10, 40], [w - 40, h - 10], [15, h - 35]])
    return cv2.warpPerspective(
        image, cv2.getPerspectiveTransform(corners, moved), (w, h), borderMode=cv2.BORDER_REFLECT
    )


def tiny_map(path: Path, images: list[np.ndarray], thumbnail_size_px: int = 240) -> VprMap:
    """A map of ``images`` at x = 0, 10, 20 ... (random global descriptors: unused here)."""
    rng = np.random.default_rng(0)
    n = len(images)
    thumbnails = (
        [encode_thumbnail(im, thumbnail_size_px) for im in images] if thumbnail_size_px else None
    )
    content = MapContent(
        MapBuildConfig(thumbnail_size_px=thumbnail_size_px),
        l2_normalize(rng.normal(size=(4, 8))).astype(np.float32),
        l2_normalize(rng.normal(size=(n, 16))).astype(np.float16),
        [f'img{i}.jpg' for i in range(n)],
        [Pose(10.0 * i, 0.0) for i in range(n)],
        thumbnails=thumbnails,
    )
    return read_map(write_map(content, path))


def shortlist(vpr_map: VprMap, order: list[int]) -> list[Candidate]:
    """Candidates ``order`` (map ids) with coarse scores 0.90, 0.89, ... (real VLAD shortlists
    span a few hundredths)."""
    content = vpr_map.content
    return [
        Candidate(i, content.image_names[i], content.poses[i], 0.9 - 0.01 * r, 0.9 - 0.01 * r)
        for r, i in enumerate(order)
    ]


def make_reranker(**fields: Any) -> GeometricReranker:
    return GeometricReranker(LocalizerConfig(rerank=RerankConfig(**fields)))


def query_of(image: np.ndarray, deadline_s: float = math.inf) -> Query:
    return Query(image, np.zeros(16, np.float32), deadline_s)


@pytest.fixture(scope='module')
def scene() -> np.ndarray:
    return texture(seed=1)


@pytest.fixture(scope='module')
def scene_map(tmp_path_factory: pytest.TempPathFactory, scene: np.ndarray) -> VprMap:
    """Map ids 0 and 1: unrelated scenes; 2: the query scene from another viewpoint."""
    return tiny_map(
        tmp_path_factory.mktemp('maps') / 'scene', [texture(seed=2), texture(seed=3), warp(scene)]
    )


def test_match_mutual_ratio_pairs_each_descriptor_with_its_noisy_copy() -> None:
    rng = np.random.default_rng(0)
    desc_a = l2_normalize(rng.random((50, 128))).astype(np.float32)
    permutation = rng.permutation(50)
    copies = l2_normalize(desc_a[permutation] + 0.01 * rng.random((50, 128)))
    distractors = l2_normalize(rng.random((30, 128)))
    desc_b = np.concatenate([copies, distractors]).astype(np.float32)
    pairs = match_mutual_ratio(desc_a, desc_b, ratio=0.9)
    assert len(pairs) == 50
    np.testing.assert_array_equal(permutation[pairs[:, 1]], pairs[:, 0])


def test_match_mutual_ratio_drops_ambiguous_matches() -> None:
    rng = np.random.default_rng(1)
    desc_a = l2_normalize(rng.random((20, 128))).astype(np.float32)
    desc_b = np.concatenate([desc_a, desc_a[:5]])  # the first five have two equal neighbours
    pairs = match_mutual_ratio(desc_a, desc_b, ratio=0.9)
    assert sorted(pairs[:, 0].tolist()) == list(range(5, 20))


def test_count_inliers_is_zero_below_the_minimal_sample() -> None:
    xy = np.random.default_rng(0).random((7, 2)).astype(np.float32) * 100
    assert count_inliers(xy, xy + 1.0, threshold_px=3.0) == 0


def test_count_inliers_is_zero_where_opencv_finds_no_model() -> None:
    # Ten matches seen on the corridor data for which OpenCV 5's MAGSAC raises
    # "!model.empty()" instead of returning no model.
    xy_a = np.float32(
        [
            [6.931757, 115.155914],
            [68.13959, 79.16183],
            [72.17698, 77.62043],
            [105.58029, 75.93262],
            [108.11253, 82.24615],
            [108.736046, 61.728134],
            [111.17794, 69.876656],
            [147.46147, 12.192009],
            [155.1427, 23.57422],
            [156.13545, 44.045544],
        ]
    )
    xy_b = np.float32(
        [
            [147.48055, 108.95593],
            [51.96808, 81.90678],
            [58.86132, 81.36375],
            [98.07944, 85.84642],
            [99.248604, 95.44103],
            [102.213036, 67.461624],
            [108.029465, 73.75423],
            [147.46431, 12.556464],
            [153.6621, 22.645086],
            [156.03436, 44.534744],
        ]
    )
    assert count_inliers(xy_a, xy_b, threshold_px=3.0) == 0


def test_warped_copy_of_the_query_gets_many_inliers_and_moves_first(
    scene: np.ndarray, scene_map: VprMap
) -> None:
    ranked = make_reranker().rerank(query_of(scene), shortlist(scene_map, [0, 1, 2]), scene_map)
    inliers = {c.map_index: c.evidence['geometric_inliers'] for c in ranked}
    assert ranked[0].map_index == 2
    assert inliers[2] >= 100
    assert max(inliers[0], inliers[1]) <= 20
    assert ranked[0].score > ranked[1].score >= ranked[2].score


def test_geometric_adds_the_bounded_inlier_bonus_to_the_incoming_score(
    scene: np.ndarray, scene_map: VprMap
) -> None:
    ranked = make_reranker(geometric_weight=0.5, geometric_half_inliers=20.0).rerank(
        query_of(scene), shortlist(scene_map, [0, 1, 2]), scene_map
    )
    for c in ranked:
        n = c.evidence['geometric_inliers']
        assert c.score == pytest.approx(c.coarse_score + 0.5 * n / (n + 20.0))


def test_geometric_with_zero_weight_keeps_the_incoming_order(
    scene: np.ndarray, scene_map: VprMap
) -> None:
    ranked = make_reranker(geometric_weight=0.0).rerank(
        query_of(scene), shortlist(scene_map, [0, 1, 2]), scene_map
    )
    assert [c.map_index for c in ranked] == [0, 1, 2]


def test_geometric_stops_verifying_at_the_deadline_and_keeps_the_rest_behind(
    scene: np.ndarray, scene_map: VprMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter(range(100))  # test double of the clock: one second per reading
    monkeypatch.setattr(geometric, 'time', SimpleNamespace(monotonic=lambda: next(ticks)))
    query = query_of(scene, deadline_s=1.5)  # readings 0 and 1 are before it, 2 is not
    ranked = make_reranker().rerank(query, shortlist(scene_map, [0, 2, 1]), scene_map)
    assert [c.map_index for c in ranked] == [2, 0, 1]
    assert 'geometric_inliers' not in ranked[2].evidence
    assert ranked[2].score == pytest.approx(0.88)
    assert any('time budget spent after 2 of 3' in note for note in query.notes)


def test_geometric_past_its_deadline_returns_the_input_order(
    scene: np.ndarray, scene_map: VprMap
) -> None:
    query = query_of(scene, deadline_s=time.monotonic() - 1.0)
    candidates = shortlist(scene_map, [0, 1, 2])
    ranked = make_reranker().rerank(query, candidates, scene_map)
    assert ranked == candidates and not any(c.evidence for c in ranked)
    assert 'time budget spent after 0 of 3' in query.notes[0]


def test_geometric_caches_map_keypoints_and_evicts_the_least_recently_used(
    scene: np.ndarray, scene_map: VprMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    original = scene_map.thumbnail

    def counting_thumbnail(map_index: int) -> np.ndarray | None:
        reads.append(map_index)
        return original(map_index)

    monkeypatch.setattr(scene_map, 'thumbnail', counting_thumbnail)
    cached = make_reranker(geometric_cache_size=3)
    for _ in range(2):
        cached.rerank(query_of(scene), shortlist(scene_map, [0, 1, 2]), scene_map)
    assert reads == [0, 1, 2]
    reads.clear()
    small = make_reranker(geometric_cache_size=2)
    for _ in range(2):
        small.rerank(query_of(scene), shortlist(scene_map, [0, 1, 2]), scene_map)
    assert reads == [0, 1, 2, 0, 1, 2]


def test_geometric_without_thumbnails_notes_it_and_keeps_the_order(
    tmp_path: Path, scene: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    bare = tiny_map(tmp_path / 'bare', [texture(2), scene], thumbnail_size_px=0)
    reranker = make_reranker()
    for _ in range(2):
        query = query_of(scene)
        candidates = shortlist(bare, [0, 1])
        ranked = reranker.rerank(query, candidates, bare)
        assert ranked == candidates and [c.score for c in ranked] == pytest.approx([0.9, 0.89])
        assert 'has no thumbnails' in query.notes[0]
    assert sum('has no thumbnails' in r.message for r in caplog.records) == 1  # logged once


def test_geometric_gives_an_unreadable_thumbnail_zero_inliers(
    tmp_path: Path, scene: np.ndarray
) -> None:
    vpr_map = tiny_map(tmp_path / 'broken', [texture(2), warp(scene)])
    (vpr_map.path / 'thumbnails' / '000001.jpg').write_bytes(b'not a jpeg')
    query = query_of(scene)
    ranked = make_reranker().rerank(query, shortlist(vpr_map, [1, 0]), vpr_map)
    broken = next(c for c in ranked if c.map_index == 1)
    assert broken.evidence['geometric_inliers'] == 0.0
    assert 'thumbnail of map image 1 is unreadable' in query.notes[0]


def test_geometric_finds_the_true_gardens_point_place_from_the_other_side(
    data_root: Path, tmp_path: Path
) -> None:
    """Real data: day_right queries against day_left map images of five places 40 apart, the
    true place always given the lowest coarse score. A broken matcher ranks it first ~1 in 5."""
    places = [20, 60, 100, 140, 180]
    folder = data_root / 'gardens_point'
    map_images = [read_image(folder / 'day_left' / 'images' / f'Image{i:03d}.jpg') for i in places]
    vpr_map = tiny_map(tmp_path / 'gp', map_images)
    reranker = make_reranker()
    firsts, margins = 0, []
    for true_id, place in enumerate(places):
        image = read_image(folder / 'day_right' / 'images' / f'Image{place:03d}.jpg')
        order = [i for i in range(len(places)) if i != true_id] + [true_id]
        ranked = reranker.rerank(query_of(image), shortlist(vpr_map, order), vpr_map)
        firsts += ranked[0].map_index == true_id
        inliers = {c.map_index: c.evidence['geometric_inliers'] for c in ranked}
        margins.append(inliers[true_id] - max(v for k, v in inliers.items() if k != true_id))
    assert firsts >= 4
    assert np.median(margins) >= 10


@pytest.mark.parametrize(
    ('fields', 'match'),
    [
        ({'geometric_max_keypoints': 4}, 'geometric_max_keypoints must be in'),
        ({'geometric_contrast_threshold': 0.0}, 'geometric_contrast_threshold must be in'),
        ({'geometric_ratio': 1.5}, r'geometric_ratio must be in \(0, 1\]'),
        ({'geometric_ransac_px': 0.0}, 'geometric_ransac_px must be > 0'),
        ({'geometric_weight': -0.1}, 'geometric_weight must be >= 0'),
        ({'geometric_half_inliers': 0.0}, 'geometric_half_inliers must be > 0'),
        ({'geometric_cache_size': -1}, 'geometric_cache_size must be >= 0'),
    ],
)
def test_rerank_config_rejects_invalid_geometric_settings(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RerankConfig(**fields)
