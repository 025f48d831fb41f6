"""The ``pairwise`` (bias-cancelling tournament) and ``pointwise`` (baseline) re-rankers, and the
re-ranker registry."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_doubles import ScriptedVlm, image_index, make_candidates, make_map, make_query

from vlm_vpr.backends.rerank import SubmapSelector, create_rerankers
from vlm_vpr.backends.rerank.pairwise import (
    PairwiseReranker,
    tournament_size,
    tournament_votes,
)
from vlm_vpr.backends.rerank.pointwise import PointwiseReranker
from vlm_vpr.core.config import LocalizerConfig, RerankConfig, VlmConfig
from vlm_vpr.core.errors import ConfigError, VlmOutputError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map

QUERY = 12


@pytest.fixture()
def vpr_map(tmp_path: Path):
    return make_map(tmp_path, [(10.0 * j, 0.0) for j in range(6)])


def config(**rerank: Any) -> LocalizerConfig:
    return LocalizerConfig(rerank=RerankConfig(**rerank))


def judge_vlm(choose: Any) -> ScriptedVlm:
    """Scripted VLM answering the pairwise question with ``choose(index_a, index_b)``."""
    return ScriptedVlm(
        lambda prompt, images: {
            'same_place': choose(image_index(images[1]), image_index(images[2]))
        }
    )


def truthful(match: int) -> Any:
    return lambda a, b: 'A' if a == match else 'B' if b == match else 'none'


def test_tournament_size_fits_both_orders_of_every_pair_in_the_call_cap() -> None:
    assert tournament_size(10, 4, 12) == 4
    assert tournament_size(10, 4, 11) == 3
    assert tournament_size(10, 4, 1) == 1
    assert tournament_size(2, 4, 12) == 2


def test_tournament_votes_cancel_a_judge_that_always_prefers_the_first_image() -> None:
    votes = tournament_votes(4, lambda i, j: 'A')
    assert votes.tolist() == [3.0, 3.0, 3.0, 3.0]
    votes = tournament_votes(4, lambda i, j: 'B')
    assert votes.tolist() == [3.0, 3.0, 3.0, 3.0]


def test_tournament_votes_let_a_biased_judge_that_spots_the_match_still_pick_it() -> None:
    # prefers A unless B is the match: only the match wins its pairs in both orders
    votes = tournament_votes(4, lambda i, j: 'B' if j == 2 else 'A')
    assert int(np.argmax(votes)) == 2 and votes[2] == 6.0


def test_pairwise_keeps_the_coarse_order_under_pure_position_bias(vpr_map) -> None:
    vlm = judge_vlm(lambda a, b: 'A')
    reranker = PairwiseReranker(config(), vpr_map, vlm)
    ranked = reranker.rerank(
        make_query(QUERY),
        make_candidates(vpr_map, [0, 1, 2, 3, 4], [0.5, 0.49, 0.48, 0.47, 0.4]),
        vpr_map,
    )
    assert [c.map_index for c in ranked] == [0, 1, 2, 3, 4]
    assert len(vlm.calls) == 12
    assert {tuple(call[1]) for call in vlm.calls} >= {(QUERY, 0, 1), (QUERY, 1, 0)}


def test_pairwise_promotes_the_match_and_leaves_the_tail_behind(vpr_map) -> None:
    vlm = judge_vlm(truthful(3))
    reranker = PairwiseReranker(config(), vpr_map, vlm)
    ranked = reranker.rerank(
        make_query(QUERY),
        make_candidates(vpr_map, [0, 1, 2, 3, 4, 5], [0.5, 0.49, 0.48, 0.47, 0.4, 0.3]),
        vpr_map,
    )
    assert [c.map_index for c in ranked] == [3, 0, 1, 2, 4, 5]
    assert ranked[0].evidence['pairwise'] == 1.0
    assert 'pairwise' not in ranked[4].evidence
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)


def test_pairwise_respects_the_vlm_call_cap(vpr_map) -> None:
    vlm = judge_vlm(truthful(3))
    reranker = PairwiseReranker(config(max_vlm_calls=6), vpr_map, vlm)
    ranked = reranker.rerank(
        make_query(QUERY), make_candidates(vpr_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]), vpr_map
    )
    assert len(vlm.calls) == 6  # three players
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]  # the match was outside the top 3


def test_pairwise_falls_back_on_a_malformed_answer(vpr_map) -> None:
    answers = iter([{'same_place': 'A'}, {'same_place': 'the left one'}])
    vlm = ScriptedVlm(lambda prompt, images: next(answers))
    reranker = PairwiseReranker(config(), vpr_map, vlm)
    query = make_query(QUERY)
    candidates = make_candidates(vpr_map, [2, 0, 1], [0.5, 0.49, 0.48])
    ranked = reranker.rerank(query, candidates, vpr_map)
    assert [c.map_index for c in ranked] == [2, 0, 1] and ranked[0].score == 0.5
    assert 'pairwise: VlmOutputError' in query.notes[0]
    assert reranker.stats['failures'] == 1


def test_pairwise_stops_when_the_time_budget_runs_out(vpr_map) -> None:
    vlm = judge_vlm(truthful(1))
    vlm.delay_s = 0.05
    reranker = PairwiseReranker(config(), vpr_map, vlm)
    query = dataclasses.replace(make_query(QUERY), deadline_s=time.monotonic() + 0.12)
    ranked = reranker.rerank(
        query, make_candidates(vpr_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]), vpr_map
    )
    assert [c.map_index for c in ranked] == [0, 1, 2, 3]
    assert 2 <= len(vlm.calls) <= 4
    assert 'time budget' in query.notes[0]


def test_spent_budget_note_quotes_the_budget_given_to_localize(
    campus_map: Path, data_root: Path
) -> None:
    cfg = config(vlm_always=True, time_budget_s=10.0)
    localizer = Localizer(read_map(campus_map), cfg)
    vlm = ScriptedVlm(lambda prompt, images: {'score': 5})
    localizer.rerankers = [PointwiseReranker(cfg, localizer.map, vlm)]
    image = read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png')
    result = localizer.localize(image, time_budget_s=1e-6)  # overrides rerank.time_budget_s
    assert vlm.calls == []
    assert any('time budget (1e-06 s) is spent' in note for note in result.notes), result.notes
    result = localizer.localize(image)
    assert len(vlm.calls) > 0 and not result.notes


def test_pairwise_needs_map_thumbnails(tmp_path: Path) -> None:
    bare = make_map(tmp_path, [(0, 0), (1, 0)], thumbnails=False)
    with pytest.raises(ConfigError, match='needs map thumbnails'):
        PairwiseReranker(config(), bare, judge_vlm(truthful(0)))


def test_pointwise_orders_rated_candidates_and_caps_the_calls(vpr_map) -> None:
    vlm = ScriptedVlm(lambda prompt, images: {'score': 9 if image_index(images[1]) == 2 else 3})
    ranked = PointwiseReranker(config(), vpr_map, vlm).rerank(
        make_query(QUERY), make_candidates(vpr_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]), vpr_map
    )
    assert [c.map_index for c in ranked] == [2, 0, 1, 3]
    assert ranked[0].evidence['pointwise'] == pytest.approx(0.9) and len(vlm.calls) == 4
    capped_vlm = ScriptedVlm(vlm.answer)
    capped = PointwiseReranker(config(max_vlm_calls=2), vpr_map, capped_vlm).rerank(
        make_query(QUERY), make_candidates(vpr_map, [0, 1, 2, 3], [0.5, 0.49, 0.48, 0.47]), vpr_map
    )
    assert [c.map_index for c in capped] == [0, 1, 2, 3] and len(capped_vlm.calls) == 2
    assert [c.score for c in capped] == [0.3, 0.3, 0.0, 0.0]


def test_pointwise_falls_back_when_a_rating_is_out_of_range(vpr_map) -> None:
    vlm = ScriptedVlm(lambda prompt, images: {'score': 42})
    query = make_query(QUERY)
    ranked = PointwiseReranker(config(), vpr_map, vlm).rerank(
        query, make_candidates(vpr_map, [1, 0], [0.5, 0.49]), vpr_map
    )
    assert [c.map_index for c in ranked] == [1, 0]
    assert 'outside [0.0, 10.0]' in query.notes[0]


def test_create_rerankers_builds_the_chain_in_order_with_one_shared_client(vpr_map) -> None:
    vlm = judge_vlm(truthful(0))
    rerankers = create_rerankers(config(chain=('pointwise', 'pairwise')), vpr_map, vlm)
    assert [r.name for r in rerankers] == ['pointwise', 'pairwise']
    assert all(r.client is vlm for r in rerankers)
    assert not isinstance(rerankers[0], SubmapSelector)


def test_create_rerankers_rejects_an_unknown_name(vpr_map) -> None:
    with pytest.raises(ConfigError, match=r"unknown re-ranker\(s\) \['vlm'\]"):
        create_rerankers(config(chain=('vlm',)), vpr_map)


def test_create_rerankers_asks_for_a_vlm_backend_when_a_vlm_reranker_is_chained(vpr_map) -> None:
    with pytest.raises(ConfigError, match=r"\['pairwise'\], which need a VLM: set vlm.backend"):
        create_rerankers(config(chain=('pairwise',)), vpr_map)


def test_create_rerankers_wants_a_vlm_backend_before_it_loads_the_text_embedder(
    vpr_map, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loaded(*args: object) -> None:
        pytest.fail('text embedder loaded before the VLM settings were checked')

    monkeypatch.setattr('vlm_vpr.backends.text_embedding.TextEmbedder', loaded)
    with pytest.raises(ConfigError, match='which need a VLM'):
        create_rerankers(config(chain=('descriptions',)), vpr_map)


def test_create_rerankers_loads_the_text_embedder_before_the_vlm(
    vpr_map, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in rerank.text_embedder fails in seconds, not after a VLM's minutes-long load."""
    monkeypatch.setattr(
        'vlm_vpr.backends.vlm.create_vlm_client', lambda config: pytest.fail('VLM loaded first')
    )
    rerank = RerankConfig(chain=('descriptions',), text_embedder=str(tmp_path / 'no_such_model'))
    localizer_config = LocalizerConfig(rerank=rerank, vlm=VlmConfig(backend='openai', model='m'))
    with pytest.raises(ConfigError, match='cannot load text embedder'):
        create_rerankers(localizer_config, vpr_map)


def test_create_rerankers_creates_the_configured_vlm_client(vpr_map) -> None:
    cfg = dataclasses.replace(
        config(chain=('pointwise',)), vlm=VlmConfig(backend='openai', model='served-vlm')
    )
    (reranker,) = create_rerankers(cfg, vpr_map)
    assert reranker.client.model_name == 'served-vlm'


def test_vlm_rerankers_leave_a_single_candidate_alone(vpr_map) -> None:
    def fail(prompt: str, images: list[np.ndarray]) -> dict[str, Any]:
        raise VlmOutputError('must not be called')

    candidates = make_candidates(vpr_map, [4], [0.2])
    reranker = PairwiseReranker(config(vlm_always=True), vpr_map, ScriptedVlm(fail))
    assert reranker.rerank(make_query(QUERY), candidates, vpr_map) == candidates
