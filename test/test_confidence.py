"""Confidence: evidence, the logistic calibration fit on synthetic evidence with known ground
truth, its storage in the map, and the reliability / ECE / precision-recall metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.core.calibration import (
    SPLIT_BLOCK,
    calibrate,
    cross_fit,
    ece_if_calibrated,
    expected_calibration_error,
    open_set_report,
    plot_precision_recall,
    plot_reliability,
    precision_recall_curve,
    reliability_curve,
)
from vlm_vpr.core.confidence import Calibration, collect_evidence, fitted_with
from vlm_vpr.core.config import (
    ConfidenceConfig,
    FusionConfig,
    LocalizerConfig,
    MapBuildConfig,
    SequenceConfig,
)
from vlm_vpr.core.errors import ConfigError, DatasetError, MapError
from vlm_vpr.core.map_format import MapContent, read_map, write_map
from vlm_vpr.core.map_format import write_extra as write_map_extra
from vlm_vpr.core.types import Candidate, Pose

TRUE_WEIGHTS = {'top1_score': 3.0, 'margin': 12.0, 'spread': -1.5}
TRUE_BIAS = -2.0


def synthetic_evidence(count: int, seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
    """Evidence drawn at random and outcomes drawn from a known logistic model."""
    rng = np.random.default_rng(seed)
    evidence = [
        {
            'top1_score': float(rng.uniform(0.0, 1.0)),
            'margin': float(rng.normal(0, 0.1)),
            'spread': float(rng.exponential(1.0)),
        }
        for _ in range(count)
    ]
    truth = np.array([true_probability(e) for e in evidence])
    return evidence, rng.random(count) < truth


def true_probability(evidence: dict[str, float]) -> float:
    z = TRUE_BIAS + sum(w * evidence[k] for k, w in TRUE_WEIGHTS.items())
    return 1.0 / (1.0 + np.exp(-z))


def test_fit_recovers_the_weights_of_a_known_logistic_model() -> None:
    evidence, correct = synthetic_evidence(20000, seed=0)
    fitted = Calibration.fit(evidence, correct, l2=0.0)
    assert fitted.fitted
    for key, weight in TRUE_WEIGHTS.items():
        assert fitted.weights[key] == pytest.approx(weight, rel=0.15), key
    assert fitted.bias == pytest.approx(TRUE_BIAS, abs=0.3)


def test_fitted_confidence_is_calibrated_on_samples_not_used_for_fitting() -> None:
    fitted = Calibration.fit(*synthetic_evidence(5000, seed=1))
    evidence, correct = synthetic_evidence(5000, seed=2)
    predicted = np.array([fitted.confidence(e) for e in evidence])
    assert expected_calibration_error(predicted, correct) < 0.03
    assert np.abs(predicted - [true_probability(e) for e in evidence]).max() < 0.1
    default = np.array([Calibration().confidence(e) for e in evidence])
    assert expected_calibration_error(default, correct) > 0.1  # the fit is what calibrates


def test_fit_gives_constant_features_zero_weight_and_keeps_the_settings() -> None:
    evidence, correct = synthetic_evidence(500, seed=3)
    for e in evidence:
        e['seq_fill'] = 1.0
    settings = fitted_with(LocalizerConfig(sequence=SequenceConfig(length=5)))
    fitted = Calibration.fit(evidence, correct, settings=settings)
    assert fitted.weights['seq_fill'] == 0.0
    assert fitted.settings == {'rerank.chain': [], 'sequence.length': 5}
    assert Calibration.from_json(fitted.to_json()) == fitted


def test_fit_rejects_samples_of_one_outcome_only() -> None:
    evidence, _ = synthetic_evidence(50, seed=4)
    with pytest.raises(DatasetError, match='both outcomes'):
        Calibration.fit(evidence, np.ones(50, bool))


def test_fit_drops_a_feature_whose_weight_goes_against_its_known_direction() -> None:
    evidence, correct = synthetic_evidence(400, seed=7)
    rng = np.random.default_rng(7)
    for e, ok in zip(evidence, correct):  # a larger margin "means wrong" in this small sample
        e['seq_margin'] = float(rng.normal(-0.5 if ok else 0.5, 1.0))
    free = Calibration.fit([dict(e, free_score=e['seq_margin']) for e in evidence], correct)
    fitted = Calibration.fit(evidence, correct)
    assert free.weights['free_score'] < 0  # evidence of unknown meaning may take either sign
    assert fitted.weights['seq_margin'] == 0.0
    for key, weight in TRUE_WEIGHTS.items():
        assert np.sign(fitted.weights[key]) == np.sign(weight), key


def test_the_off_track_accuracy_leaves_out_frames_before_the_sequence_filled() -> None:
    def frame(on: bool, fill: float) -> dict[str, float]:
        return {
            'top1_score': 0.5,
            'track_consistency': 1.0 if on else 0.2,
            'progress_error': 0.1 if on else 0.9,
            'seq_fill': fill,
        }

    evidence = [frame(True, 1.0)] * 8 + [frame(False, 0.3)] * 9 + [frame(False, 1.0)] * 4
    correct = [True] * 6 + [False] * 2 + [True] * 9 + [True] + [False] * 3
    assert Calibration.fit(evidence, correct).off_track == pytest.approx((1 + 1) / (4 + 2))
    warming_up_only = evidence[:17]  # no full-sequence off-track sample: all off-track ones
    assert Calibration.fit(warming_up_only, correct[:17]).off_track == pytest.approx(10 / 11)


def test_fit_warns_when_the_on_track_rule_or_the_off_track_confidence_lacks_samples(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def frame(on: bool, score: float) -> dict[str, float]:
        return {
            'top1_score': score,
            'track_consistency': 1.0 if on else 0.2,
            'progress_error': 0.1 if on else 0.9,
            'seq_fill': 1.0,
        }

    on_track_all_correct = [frame(True, 0.6)] * 6 + [frame(False, 0.4)] * 6
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        fitted = Calibration.fit(on_track_all_correct, [True] * 6 + [True, False] * 3)
    assert fitted.off_track is None
    assert 'on-track results in the calibration split: 6, correct: 6' in caplog.text

    caplog.clear()
    only_on_track = [frame(True, 0.6)] * 4 + [frame(True, 0.4)] * 4
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        fitted = Calibration.fit(only_on_track, [True] * 4 + [False] * 4)
    assert fitted.off_track == 0.5
    assert 'no off-track result' in caplog.text

    caplog.clear()
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        Calibration.fit(
            on_track_all_correct[:2] + [frame(True, 0.4)] * 2 + [frame(False, 0.4)] * 2,
            [True, True, False, False, True, False],
        )
    assert caplog.text == ''  # both outcomes on track, off-track samples present


def test_off_track_sequence_results_get_the_observed_accuracy_of_such_results() -> None:
    evidence, correct = synthetic_evidence(600, seed=8)
    rng = np.random.default_rng(8)
    track = rng.random(600) < 0.7
    for e, t in zip(evidence, track):
        e['track_consistency'] = 1.0 if t else 0.2
        e['progress_error'] = 0.1 if t else 0.9
    # off the track, a strong coarse score and margin come from aliasing: mostly wrong
    correct = np.where(track, correct, rng.random(600) < 0.1)
    for e, t in zip(evidence, track):
        if not t:
            e['top1_score'], e['margin'] = 1.0, 0.3

    fitted = Calibration.fit(evidence, correct)

    expected = (correct[~track].sum() + 1) / ((~track).sum() + 2)
    assert fitted.off_track == pytest.approx(expected)
    off = next(e for e, t in zip(evidence, track) if not t)
    assert fitted.confidence(off) == pytest.approx(expected) and expected < 0.2
    on = [e for e, t in zip(evidence, track) if t]
    assert len({round(fitted.confidence(e), 6) for e in on}) > 100  # the logistic model
    assert Calibration.from_json(fitted.to_json()) == fitted
    single_frame = {k: v for k, v in off.items() if k not in ('track_consistency',)}
    assert fitted.confidence(single_frame) > 0.5  # no sequence evidence: no track gate
    old = {k: v for k, v in fitted.to_json().items() if k != 'off_track'}
    assert Calibration.from_json(old).off_track is None  # calibrations stored before the gate


@pytest.mark.parametrize(
    ('data', 'match'),
    [
        ({'bias': 0.0}, 'malformed'),
        ({'weights': {'margin': 'x'}, 'bias': 0.0}, 'malformed'),
        ({'weights': {'margin': float('nan')}, 'bias': 0.0}, 'non-finite'),
        ({'weights': {}, 'bias': 0.0, 'off_track': 1.5}, 'off_track'),
    ],
)
def test_calibration_from_json_rejects_bad_data(data: dict, match: str) -> None:
    with pytest.raises(MapError, match=match):
        Calibration.from_json(data)


def tiny_map(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(4, 16)).astype(np.float32)
    content = MapContent(
        MapBuildConfig(thumbnail_size_px=0),
        np.eye(8, 128, dtype=np.float32),
        (desc / np.linalg.norm(desc, axis=1, keepdims=True)).astype(np.float16),
        [f'{i}.png' for i in range(4)],
        [Pose(float(i), 0.0) for i in range(4)],
    )
    return write_map(content, tmp_path / 'map')


def in_map_rows(evidence: list[dict[str, float]], correct: np.ndarray) -> list[dict]:
    """Report rows of in-map queries with this evidence, top-1 correct or not."""
    return [
        {
            'evidence': e,
            'confidence': 0.5,
            'truth_xy': [0.0, 0.0],
            'first_correct_rank': 1 if ok else 3,
        }
        for e, ok in zip(evidence, correct)
    ]


def test_calibrate_stores_the_fit_in_the_map_and_rescores_the_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    map_dir = tiny_map(tmp_path)
    evidence, correct = synthetic_evidence(400, seed=5)
    per_query = in_map_rows(evidence, correct)
    config = LocalizerConfig(sequence=SequenceConfig(length=3))

    report = calibrate({'per_query': per_query}, map_dir, config)

    stored = Calibration.from_map(read_map(map_dir, load_index=False), config)
    assert stored.fitted and stored.to_json() == report['calibration']
    assert [q['confidence'] for q in report['per_query']] == [
        stored.confidence(e) for e in evidence
    ]
    assert report['open_set']['ece'] < 0.1
    other = LocalizerConfig(sequence=SequenceConfig(length=1))  # settings it was not fitted for
    assert not Calibration.from_map(read_map(map_dir, load_index=False), other).fitted
    uncalibrated = read_map(tiny_map(tmp_path / 'b'), load_index=False)
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        assert not Calibration.from_map(uncalibrated, config).fitted
    assert 'has no confidence calibration yet: default weights' in caplog.text

    # a calibration for other settings is kept beside it; one for the same settings replaces it
    calibrate({'per_query': per_query[:200]}, map_dir, other)
    refit = calibrate({'per_query': per_query[200:]}, map_dir, config)
    vpr_map = read_map(map_dir, load_index=False)
    assert len(vpr_map.read_extra_json('calibration')['calibrations']) == 2
    assert Calibration.from_map(vpr_map, other).settings == fitted_with(other)
    assert Calibration.from_map(vpr_map, config).to_json() == refit['calibration']


@pytest.mark.parametrize('folds', [2, 3])
def test_cross_fit_scores_each_block_with_a_fit_on_the_other_folds_only(folds: int) -> None:
    evidence, correct = synthetic_evidence(205, seed=11)
    rows = in_map_rows(evidence, correct)
    config = LocalizerConfig()

    report = cross_fit({'per_query': rows, 'split': None}, config, folds)

    assert report['cross_fit']['folds'] == folds
    for k in range(folds):  # direct: fit on the rows of every other fold, score this one
        mine = [(i // SPLIT_BLOCK) % folds == k for i in range(len(rows))]
        fit = Calibration.fit(
            [e for e, m in zip(evidence, mine) if not m],
            correct[~np.array(mine)],
            config.confidence.calibration_l2,
        )
        assert report['cross_fit']['calibrations'][k]['weights'] == fit.weights
        got = [q['confidence'] for q, m in zip(report['per_query'], mine) if m]
        assert got == [fit.confidence(e) for e, m in zip(evidence, mine) if m]
    confidence = np.array([q['confidence'] for q in report['per_query']])
    assert report['open_set']['ece'] == round(expected_calibration_error(confidence, correct), 4)
    assert [q['confidence'] for q in rows] == [0.5] * len(rows)  # the input report is kept


def test_cross_fit_rejects_bad_folds_a_split_and_a_fold_without_both_outcomes() -> None:
    evidence, correct = synthetic_evidence(40, seed=12)
    report = {'per_query': in_map_rows(evidence, correct), 'split': None}
    for folds in (1, 5):  # 40 queries are 4 blocks
        with pytest.raises(ConfigError, match='2 to 4 folds'):
            cross_fit(report, LocalizerConfig(), folds)
    with pytest.raises(ConfigError, match='drop the split'):
        cross_fit(dict(report, split='test'), LocalizerConfig(), 2)
    lopsided = np.r_[np.ones(10, bool), np.zeros(30, bool)]  # all correct only in block 0
    lopsided[20] = True
    with pytest.raises(DatasetError, match='fold 1 of 2'):
        cross_fit(
            {'per_query': in_map_rows(evidence, lopsided), 'split': None}, LocalizerConfig(), 2
        )


def test_a_calibration_stored_before_per_settings_storage_still_loads(tmp_path: Path) -> None:
    map_dir = tiny_map(tmp_path)
    config = LocalizerConfig(sequence=SequenceConfig(length=3))
    old = {'weights': {'margin': 5.0}, 'bias': -1.0, 'fitted_with': fitted_with(config)}
    write_map_extra(map_dir, 'calibration', old)
    loaded = Calibration.from_map(read_map(map_dir, load_index=False), config)
    assert loaded.fitted and loaded.weights == {'margin': 5.0} and loaded.off_track is None
    write_map_extra(map_dir, 'calibration', {'calibrations': {'weights': {}}})
    with pytest.raises(MapError, match='malformed'):
        Calibration.from_map(read_map(map_dir, load_index=False), config)
    evidence, correct = synthetic_evidence(200, seed=9)  # calibrating again replaces it
    per_query = in_map_rows(evidence, correct)
    calibrate({'per_query': per_query}, map_dir, config)
    assert Calibration.from_map(read_map(map_dir, load_index=False), config).fitted


def candidate(index: int, x: float, score: float, **evidence: float) -> Candidate:
    return Candidate(index, f'{index}.png', Pose(x, 0.0), score, score, dict(evidence))


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
def test_non_finite_evidence_gives_zero_confidence_and_a_warning(
    bad: float, caplog: pytest.LogCaptureFixture
) -> None:
    calibration = Calibration({'top1_score': 22.1, 'margin': 14.4, 'vlm_score': 1.0}, -11.9)
    good = {'top1_score': 0.9, 'margin': 0.2, 'vlm_score': 0.5}
    assert calibration.confidence(good) > 0.5
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        assert calibration.confidence(dict(good, vlm_score=bad)) == 0.0
        assert Calibration().confidence({'top1_score': bad, 'margin': 0.0}) == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 2 and 'vlm_score' in warnings[0] and 'top1_score' in warnings[1]


def test_evidence_margin_is_the_lead_over_the_best_other_place() -> None:
    fusion = FusionConfig(top_n=3, cluster_radius_m=5.0)
    coarse = [
        candidate(0, 0.0, 0.9),
        candidate(1, 2.0, 0.88),
        candidate(2, 40.0, 0.8),
        candidate(3, 60.0, 0.7),
    ]
    final = [candidate(2, 40.0, 0.8, geometric_inliers=19.0), coarse[0], coarse[1]]

    evidence = collect_evidence(coarse, final, fusion)

    assert evidence['top1_score'] == pytest.approx(0.8)
    assert evidence['margin'] == pytest.approx(0.8 - 0.9)  # the coarse best is elsewhere
    assert evidence['rerank_agrees'] == 0.0
    assert evidence['geometric_inliers'] == pytest.approx(np.log(20.0))
    expected_spread = np.sqrt((40.0**2 + 38.0**2) / 2) / 5.0
    assert evidence['spread'] == pytest.approx(expected_spread)
    alone = collect_evidence(coarse[:2], coarse[:2], fusion)  # no other place in the list
    assert alone['margin'] == pytest.approx(0.9 - 0.88)  # lead over the weakest listed
    assert alone['rerank_agrees'] == 1.0


def test_reliability_and_ece_match_a_direct_computation() -> None:
    rng = np.random.default_rng(6)
    confidence = rng.random(300)
    correct = rng.random(300) < confidence**2
    curve = reliability_curve(confidence, correct, bins=5)
    ece = 0.0
    for b in range(5):
        inside = (confidence >= b / 5) & (confidence < (b + 1) / 5)
        assert curve[b]['count'] == inside.sum()
        assert curve[b]['accuracy'] == pytest.approx(correct[inside].mean())
        ece += inside.sum() / 300 * abs(correct[inside].mean() - confidence[inside].mean())
    assert expected_calibration_error(confidence, correct, bins=5) == pytest.approx(ece)


def test_ece_if_calibrated_is_the_ece_of_outcomes_drawn_from_the_confidences() -> None:
    rng = np.random.default_rng(7)
    confidence = rng.random(16)
    median, p90 = ece_if_calibrated(confidence, draws=400, seed=3)
    draws = np.random.default_rng(3).random((400, 16)) < confidence  # the same seeded draws
    direct = [expected_calibration_error(confidence, c) for c in draws]
    assert median == pytest.approx(np.median(direct))
    assert p90 == pytest.approx(np.percentile(direct, 90))
    assert 0.05 < median < p90  # 16 queries: a perfect model's ECE is far from 0
    big = ece_if_calibrated(rng.random(4000), draws=200)
    assert big[1] < 0.03  # and shrinks with the number of queries
    assert ece_if_calibrated(np.array([])) == (0.0, 0.0)


def test_precision_recall_curve_groups_tied_confidences() -> None:
    curve = precision_recall_curve(
        np.array([0.9, 0.8, 0.8, 0.3]), np.array([True, False, True, True]), num_in_map=5
    )
    np.testing.assert_allclose(curve, [[0.9, 1.0, 0.2], [0.8, 2 / 3, 0.4], [0.3, 0.75, 0.6]])


def test_open_set_report_counts_false_accepts_and_recall_at_full_precision(tmp_path: Path) -> None:
    rows = [
        (0.95, [0, 0], 1),
        (0.92, None, None),
        (0.85, [1, 0], 1),
        (0.6, [2, 0], 2),
        (0.3, None, None),
        (0.2, [3, 0], None),
    ]
    per_query = [{'confidence': c, 'truth_xy': t, 'first_correct_rank': r} for c, t, r in rows]
    report = open_set_report(per_query, threshold=0.9)
    assert report['num_in_map'] == 4 and report['num_out_of_map'] == 2
    assert report['false_accept_rate'] == 0.5 and report['wrong_accepts'] == 1
    assert report['accepted_in_map'] == 0.25
    assert report['precision'] == 0.5 and report['recall'] == 0.25
    assert report['recall_at_full_precision'] == 0.25
    assert open_set_report(per_query, threshold=0.99)['precision'] == 1.0
    full = {'dataset': 'd', 'protocol': 'p', 'open_set': report}
    plot_reliability([full], tmp_path / 'rel.png')
    plot_precision_recall([full], tmp_path / 'pr.png')
    assert (tmp_path / 'rel.png').stat().st_size > 0 and (tmp_path / 'pr.png').stat().st_size > 0


def test_open_set_report_and_precision_recall_curve_of_no_queries_are_empty(
    tmp_path: Path,
) -> None:
    assert precision_recall_curve(np.zeros(0), np.zeros(0, bool), num_in_map=0).shape == (0, 3)
    report = open_set_report([], threshold=0.9)
    assert report['num_in_map'] == report['num_out_of_map'] == report['wrong_accepts'] == 0
    for key in ('accepted_in_map', 'false_accept_rate', 'recall', 'recall_at_full_precision'):
        assert report[key] == 0.0, key
    assert report['ece'] == 0.0 and report['ece_if_calibrated'] == [0.0, 0.0]
    assert report['pr_curve'] == [] and report['reliability'] == []
    full = {'dataset': 'd', 'protocol': 'p', 'open_set': report}
    plot_reliability([full], tmp_path / 'rel.png')
    plot_precision_recall([full], tmp_path / 'pr.png')
    assert (tmp_path / 'pr.png').stat().st_size > 0


@pytest.mark.parametrize(
    ('values', 'match'),
    [
        ({'initial_pose_threshold': 0.0}, 'initial_pose_threshold'),
        ({'initial_pose_threshold': 1.5}, 'initial_pose_threshold'),
        ({'calibration_l2': -1.0}, 'calibration_l2'),
    ],
)
def test_confidence_config_rejects_bad_values(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ConfidenceConfig(**values)
