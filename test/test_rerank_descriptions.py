"""The ``descriptions`` re-ranker: scoring rule with real Sentence-BERT embeddings, tau, ties,
empty descriptions, the ambiguity gate, the time budget and falling back on VLM failures."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_doubles import ScriptedVlm, image_index, make_candidates, make_map, make_query

from vlm_vpr.backends.rerank.descriptions import (
    DescriptionsReranker,
    description_scores,
    order_by_description_scores,
)
from vlm_vpr.backends.text_embedding import BUNDLED_MODEL, TextEmbedder, _bundled_path
from vlm_vpr.backends.vlm import VlmTimeoutError
from vlm_vpr.core.config import LocalizerConfig, RerankConfig
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.map_describe import DESCRIPTIONS_EXTRA, describe_map, load_map_descriptions
from vlm_vpr.core.map_format import read_map, write_extra

QUERY_COLOUR = 10
MAP_TEXTS = {
    0: ['a red brick building with arched windows', 'a row of tall palm trees'],
    1: ['a glass office tower', 'a multi-storey car park'],
    2: ['a stone bridge over a river', 'a white lighthouse'],
    3: ['a glass office tower', 'a multi-storey car park'],  # same place look as 1: a tie
}
QUERY_TEXTS = [('an old stone bridge across the river', 3.0), ('a lighthouse on the coast', 1.0)]


def answer_from(texts: dict[int, list[Any]]) -> ScriptedVlm:
    """A scripted VLM describing each image (by colour) with ``texts`` (text or (text, w))."""

    def answer(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        items = texts[image_index(images[0])]
        pairs = [item if isinstance(item, tuple) else (item, 1.0) for item in items]
        return {'descriptions': [{'text': t, 'weight': w} for t, w in pairs]}

    return ScriptedVlm(answer)


@pytest.fixture()
def described_map(tmp_path: Path, embedder: TextEmbedder):
    vpr_map = make_map(tmp_path, [(0, 0), (10, 0), (20, 0), (30, 0)])
    describe_map(
        vpr_map.path, LocalizerConfig().vlm, RerankConfig(), answer_from(MAP_TEXTS), embedder
    )
    return read_map(vpr_map.path)


def config(**rerank: Any) -> LocalizerConfig:
    return LocalizerConfig(rerank=RerankConfig(chain=('descriptions',), **rerank))


def test_description_scores_follow_the_weighted_best_match_formula(embedder: TextEmbedder) -> None:
    map_texts = [t for j in range(3) for t in MAP_TEXTS[j]]
    owners = np.array([j for j in range(3) for _ in MAP_TEXTS[j]])
    weights = np.array([0.75, 0.25], np.float32)
    query_e = embedder.embed([t for t, _ in QUERY_TEXTS])
    map_e = embedder.embed(map_texts)
    scores, described = description_scores(weights, query_e, map_e, owners, np.array([2, 0, 1, 7]))
    for c, j in enumerate([2, 0, 1]):
        rows = [map_e[r] for r in range(len(map_texts)) if owners[r] == j]
        expected = sum(
            a * max(float(np.dot(q, e)) for e in rows) for a, q in zip(weights, query_e)
        )
        assert scores[c] == pytest.approx(expected, abs=1e-5)
    assert described.tolist() == [True, True, True, False]
    assert scores[3] == 0.0
    assert scores[0] > 0.6 > max(scores[1], scores[2])  # the bridge/lighthouse place wins


def test_identical_descriptions_score_one_and_embeddings_are_unit_length(
    embedder: TextEmbedder,
) -> None:
    vectors = embedder.embed(MAP_TEXTS[1])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    scores, _ = description_scores(
        np.array([0.5, 0.5], np.float32), vectors, vectors, np.array([4, 4]), np.array([4])
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert embedder.embed([]).shape == (0, vectors.shape[1])


def test_order_puts_scores_above_tau_first_and_keeps_the_rest_in_input_order() -> None:
    scores = np.array([0.2, 0.9, 0.5, 0.6, 0.95])
    described = np.array([True, True, True, True, False])
    assert order_by_description_scores(scores, described, 0.5) == [1, 3, 0, 2, 4]
    assert order_by_description_scores(scores, described, 0.0) == [1, 3, 2, 0, 4]
    assert order_by_description_scores(scores, described, 0.99) == [0, 1, 2, 3, 4]


def test_order_keeps_input_order_between_tied_scores() -> None:
    scores = np.array([0.7, 0.8, 0.7, 0.8])
    assert order_by_description_scores(scores, np.ones(4, bool), 0.5) == [1, 3, 0, 2]


def test_reranker_moves_the_described_match_first_with_one_vlm_call(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: QUERY_TEXTS})
    reranker = DescriptionsReranker(config(), described_map, vlm, embedder)
    query = make_query(QUERY_COLOUR)
    ranked = reranker.rerank(
        query,
        make_candidates(described_map, [0, 1, 2, 3], [0.50, 0.49, 0.48, 0.47]),
        described_map,
    )
    assert [c.map_index for c in ranked][0] == 2
    assert len(vlm.calls) == 1 and vlm.calls[0][1] == [QUERY_COLOUR]
    assert 0 < vlm.calls[0][2] <= 30.0  # the remaining budget is the call's timeout
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all('descriptions' in c.evidence for c in ranked)
    assert query.notes == []


def test_reranker_keeps_tied_candidates_in_coarse_order(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: MAP_TEXTS[1]})
    reranker = DescriptionsReranker(config(), described_map, vlm, embedder)
    for ids in ([3, 1, 0, 2], [1, 3, 0, 2]):
        ranked = reranker.rerank(
            make_query(QUERY_COLOUR),
            make_candidates(described_map, ids, [0.5, 0.5, 0.5, 0.5]),
            described_map,
        )
        assert [c.map_index for c in ranked][:2] == ids[:2]


def test_reranker_with_a_high_tau_keeps_the_coarse_order(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: QUERY_TEXTS})
    reranker = DescriptionsReranker(config(tau=0.99), described_map, vlm, embedder)
    ranked = reranker.rerank(
        make_query(QUERY_COLOUR),
        make_candidates(described_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]),
        described_map,
    )
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    assert all(c.score <= 0.99 for c in ranked)


def test_reranker_falls_back_when_the_query_gets_only_empty_descriptions(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: ['', '   ']})
    reranker = DescriptionsReranker(config(), described_map, vlm, embedder)
    query = make_query(QUERY_COLOUR)
    candidates = make_candidates(described_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47])
    ranked = reranker.rerank(query, candidates, described_map)
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    assert [c.score for c in ranked] == [0.5, 0.49, 0.48, 0.47]
    assert 'no usable description' in query.notes[0]
    assert reranker.stats['failures'] == 1


def test_reranker_ranks_a_map_image_without_descriptions_behind(
    tmp_path: Path, embedder: TextEmbedder
) -> None:
    vpr_map = make_map(tmp_path, [(0, 0), (10, 0), (20, 0)])
    texts = {0: [], 1: MAP_TEXTS[1], 2: MAP_TEXTS[2], QUERY_COLOUR: QUERY_TEXTS}
    describe_map(vpr_map.path, LocalizerConfig().vlm, RerankConfig(), answer_from(texts), embedder)
    vpr_map = read_map(vpr_map.path)
    assert load_map_descriptions(vpr_map).texts[0] == []
    reranker = DescriptionsReranker(config(tau=0.0), vpr_map, answer_from(texts), embedder)
    ranked = reranker.rerank(
        make_query(QUERY_COLOUR), make_candidates(vpr_map, [0, 1, 2], [0.5, 0.49, 0.48]), vpr_map
    )
    assert [c.map_index for c in ranked] == [2, 1, 0]


def test_reranker_without_map_descriptions_describes_candidates_online_with_same_result(
    tmp_path: Path, described_map, embedder: TextEmbedder
) -> None:
    bare_map = make_map(tmp_path / 'bare', [(0, 0), (10, 0), (20, 0), (30, 0)])
    texts = {**MAP_TEXTS, QUERY_COLOUR: QUERY_TEXTS}
    results = []
    for vpr_map in (bare_map, described_map):
        vlm = answer_from(texts)
        reranker = DescriptionsReranker(config(), vpr_map, vlm, embedder)
        ranked = reranker.rerank(
            make_query(QUERY_COLOUR),
            make_candidates(vpr_map, [3, 0, 1, 2], [0.5, 0.49, 0.48, 0.47]),
            vpr_map,
        )
        results.append(([c.map_index for c in ranked], [c.score for c in ranked], len(vlm.calls)))
    (online_order, online_scores, online_calls), (order, scores, calls) = results
    assert online_order == order
    assert online_scores == pytest.approx(scores, abs=1e-5)
    assert (online_calls, calls) == (5, 1)


def test_reranker_skips_the_vlm_when_the_coarse_result_is_clear(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: QUERY_TEXTS})
    reranker = DescriptionsReranker(
        config(vlm_margin_threshold=0.05), described_map, vlm, embedder
    )
    candidates = make_candidates(described_map, [0, 1, 2, 3], [0.9, 0.5, 0.48, 0.47])
    assert reranker.rerank(make_query(QUERY_COLOUR), candidates, described_map) == candidates
    assert vlm.calls == [] and reranker.stats['skipped'] == 1
    always = DescriptionsReranker(config(vlm_always=True), described_map, vlm, embedder)
    ranked = always.rerank(make_query(QUERY_COLOUR), candidates, described_map)
    assert ranked[0].map_index == 2 and len(vlm.calls) == 1


def test_reranker_with_a_spent_time_budget_notes_it_and_keeps_the_order(
    described_map, embedder: TextEmbedder
) -> None:
    vlm = answer_from({QUERY_COLOUR: QUERY_TEXTS})
    reranker = DescriptionsReranker(config(), described_map, vlm, embedder)
    query = dataclasses.replace(make_query(QUERY_COLOUR), deadline_s=time.monotonic() - 1.0)
    ranked = reranker.rerank(
        query, make_candidates(described_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]), described_map
    )
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    assert vlm.calls == []
    assert 'VlmTimeoutError' in query.notes[0] and 'time budget' in query.notes[0]


def test_reranker_notes_a_vlm_failure_and_keeps_the_order(
    described_map, embedder: TextEmbedder
) -> None:
    def fail(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        raise VlmTimeoutError('server took too long')

    reranker = DescriptionsReranker(config(), described_map, ScriptedVlm(fail), embedder)
    query = make_query(QUERY_COLOUR)
    ranked = reranker.rerank(
        query, make_candidates(described_map, [1, 0, 2, 3], [0.5, 0.49, 0.48, 0.47]), described_map
    )
    assert [c.map_index for c in ranked] == [1, 0, 2, 3]
    assert 'descriptions: VlmTimeoutError: server took too long' in query.notes[0]


def test_reranker_rejects_map_descriptions_from_another_text_embedder(
    described_map, embedder: TextEmbedder
) -> None:
    meta = described_map.read_extra_json(DESCRIPTIONS_EXTRA)
    write_extra(described_map.path, DESCRIPTIONS_EXTRA, {**meta, 'text_embedder': 'other-sbert'})
    with pytest.raises(ConfigError, match="embedded with 'other-sbert'.*map describe"):
        DescriptionsReranker(config(), read_map(described_map.path), answer_from({}), embedder)


def test_text_embedder_loads_a_model_folder_given_with_a_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / 'minilm').symlink_to(_bundled_path())
    monkeypatch.setenv('HOME', str(tmp_path))
    embedder = TextEmbedder('~/minilm')
    assert embedder.model_name == '~/minilm'  # as configured: maps store and compare it
    assert embedder.embed(['a red door']).shape == (1, embedder.dim)


def test_text_embedder_reports_a_model_it_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f'cannot load text embedder.*{BUNDLED_MODEL}'):
        TextEmbedder(str(tmp_path / 'no_such_model'))


def test_text_embedder_refuses_a_folder_that_loads_but_cannot_embed(tmp_path: Path) -> None:
    """The bundled model without its pooling module: it loads, but gives no sentence vector."""
    bundled = Path(_bundled_path())
    for item in bundled.iterdir():
        if item.name != 'modules.json':
            (tmp_path / item.name).symlink_to(item)
    modules = json.loads((bundled / 'modules.json').read_text())
    (tmp_path / 'modules.json').write_text(json.dumps(modules[:1]))  # the Transformer only
    with pytest.raises(ConfigError, match='loads but cannot embed a sentence.*pooling'):
        TextEmbedder(str(tmp_path))


@pytest.mark.parametrize(
    'fields, match',
    [
        ({'tau': 1.0}, r'rerank.tau must be in \[0, 1\)'),
        ({'num_descriptions': 0}, 'rerank.num_descriptions'),
        ({'time_budget_s': 0}, 'rerank.time_budget_s'),
        ({'pairwise_top_n': 1}, 'rerank.pairwise_top_n'),
        ({'max_vlm_calls': 0}, 'rerank.max_vlm_calls'),
        ({'region_count': 0}, 'rerank.region_count'),
    ],
)
def test_rerank_config_rejects_invalid_vlm_settings(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RerankConfig(**fields)
