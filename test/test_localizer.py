"""The Localizer on a real map (campus_loop), and its behaviour on bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.datasets import read_traversal
from vlm_vpr.core.errors import ImageError, NoFeaturesError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map
from vlm_vpr.core.retrieval import ids_within_radius


@pytest.fixture(scope='module')
def localizer(campus_map: Path) -> Localizer:
    return Localizer.from_map_path(campus_map, LocalizerConfig(top_k=5))


def test_campus_queries_are_localised_within_five_metres(
    localizer: Localizer, data_root: Path
) -> None:
    queries = read_traversal(data_root / 'campus_loop' / 'query')
    errors = []
    for path, truth in zip(queries.image_paths, queries.xy):
        result = localizer.localize(read_image(path))
        errors.append(float(np.hypot(result.pose.x - truth[0], result.pose.y - truth[1])))
    within = np.mean(np.array(errors) <= 5.0)
    assert within >= 0.85, f'only {within:.0%} of queries within 5 m (errors {errors})'


def test_result_has_ranked_candidates_valid_covariance_and_timings(
    localizer: Localizer, data_root: Path
) -> None:
    image = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_11.png')
    result = localizer.localize(image)
    assert len(result.candidates) == 5
    scores = [c.coarse_score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    cov = result.covariance
    assert cov.shape == (6, 6) and np.isfinite(cov).all()
    assert (np.diag(cov) > 0).all() and np.allclose(cov, cov.T)
    assert 0.0 <= result.confidence <= 1.0
    assert {'extract', 'aggregate', 'search', 'fuse', 'total'} <= set(result.timing_ms)


def test_map_image_finds_itself_first(localizer: Localizer, data_root: Path) -> None:
    result = localizer.localize(
        read_image(data_root / 'campus_loop' / 'map' / 'images' / 'image_20.png')
    )
    assert result.candidates[0].image_name == 'image_20.png'
    assert result.candidates[0].coarse_score > 0.99


def test_submap_restricts_candidates_to_the_given_ids(
    localizer: Localizer, data_root: Path
) -> None:
    vpr_map = localizer.map
    submap = ids_within_radius(vpr_map.positions_xyz, (0.0, 0.0), 25.0)
    assert 0 < len(submap) < len(vpr_map)
    image = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png')
    result = localizer.localize(image, submap=submap)
    assert {c.map_index for c in result.candidates} <= set(submap.tolist())


@pytest.mark.parametrize(
    ('image', 'message'),
    [
        (np.zeros((0, 10, 3), np.uint8), 'empty'),
        (np.zeros((10, 10, 3), np.float32), 'expected a uint8 image'),
        (np.zeros((10, 10, 2), np.uint8), '2 channels'),
        (np.zeros((10001, 10001), np.uint8), 'exceeds'),
    ],
)
def test_bad_images_raise_image_error(
    localizer: Localizer, image: np.ndarray, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        localizer.localize(image)


@pytest.mark.parametrize('grey', [0, 128])  # a lens cap, a blank wall
def test_an_image_without_a_usable_feature_raises_instead_of_answering_at_random(
    localizer: Localizer, data_root: Path, grey: int
) -> None:
    good = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_5.png')
    blank = np.full((240, 320, 3), grey, np.uint8)
    with pytest.raises(NoFeaturesError, match='no usable local feature.*blank, dark'):
        localizer.localize(blank)
    batch = localizer.localize_batch([good, blank])  # in a batch: in its place, others go on
    assert isinstance(batch[1], NoFeaturesError)
    assert not isinstance(batch[0], NoFeaturesError)
    alone = localizer.localize(good)
    assert [c.map_index for c in batch[0].candidates] == [c.map_index for c in alone.candidates]


def test_grey_and_bgra_images_are_accepted(localizer: Localizer, data_root: Path) -> None:
    bgr = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_5.png')
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])
    ids = {localizer.localize(im).candidates[0].map_index for im in (bgr, bgr[:, :, 0], bgra)}
    assert len(ids) == 1


def test_describe_matches_the_stored_descriptor_of_a_map_image(
    campus_map: Path, localizer: Localizer, data_root: Path
) -> None:
    vpr_map = read_map(campus_map)
    i = vpr_map.content.image_names.index('image_30.png')
    descriptor = localizer.describe(
        read_image(data_root / 'campus_loop' / 'map' / 'images' / 'image_30.png')
    )
    stored = vpr_map.content.descriptors[i].astype(np.float32)
    assert float(descriptor @ stored) > 0.999


def test_empty_submap_falls_back_to_the_whole_map_with_a_note(
    localizer: Localizer, data_root: Path
) -> None:
    image = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png')
    result = localizer.localize(image, submap=np.array([], dtype=np.int64))
    assert len(result.candidates) == 5
    assert any('submap holds no map image' in note for note in result.notes)


def test_a_batch_gives_the_results_of_one_image_at_a_time(
    localizer: Localizer, data_root: Path
) -> None:
    paths = read_traversal(data_root / 'campus_loop' / 'query').image_paths[:3]
    images = [read_image(p) for p in paths]
    images[1] = images[1][: images[1].shape[0] * 3 // 4]  # another size: another forward pass
    batch = localizer.localize_batch(images)
    alone = [localizer.localize(image) for image in images]
    assert len(batch) == 3
    for b, a in zip(batch, alone):
        assert [c.map_index for c in b.candidates] == [c.map_index for c in a.candidates]
        np.testing.assert_allclose(
            [c.score for c in b.candidates], [c.score for c in a.candidates], atol=1e-5
        )
        assert b.confidence == pytest.approx(a.confidence, abs=1e-5)
    assert batch[0].candidates[0].map_index != batch[2].candidates[0].map_index
