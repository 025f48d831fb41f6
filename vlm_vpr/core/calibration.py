"""How well confidence predicts correctness: reliability curve, ECE, open-set precision/recall.

A query is *correct* when it is in the map and its top-1 lies within the protocol tolerance; it
is *accepted* when its confidence reaches the operating threshold (the default
``confidence.initial_pose_threshold``, the gate for ``/initialpose``). Out-of-map queries (no
map image within tolerance of their true place) are never correct.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr.core.confidence import Calibration, fitted_with, stored_calibrations
from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.errors import ConfigError, DatasetError, MapError
from vlm_vpr.core.map_format import read_map, write_extra

log = logging.getLogger(__name__)

RELIABILITY_BINS = 10
# bag report fields scored with the old fit, and the settings of those gate runs
BEFORE_THE_FIT = ('at_threshold', 'initial_pose', 'initial_pose_gate')
SPLIT_BLOCK = 10  # consecutive queries per block: the fit / test split and the cross-fit folds


def calibrate(
    report: dict[str, Any], map_dir: str | Path, config: LocalizerConfig
) -> dict[str, Any]:
    """Fit evidence -> P(top-1 correct) on the report's queries and store it in the map.

    ``report`` comes from :func:`vlm_vpr.core.evaluation.run_queries` (or ``evaluate``) on
    the calibration split, or from :func:`vlm_vpr.core.bag_eval.evaluate_bags`, run with
    ``config``. The calibration goes into the map extra
    ``calibration``, replacing one fitted with the same query settings (``fitted_with``) and
    keeping those for other settings (unreadable ones are replaced, with a warning); the
    returned report holds it (``calibration``) and is re-scored with it, so its ``open_set``
    numbers (ECE included) are in-sample: measure on another split. A bag report's accepted
    rates and /initialpose gate runs (``at_threshold``, ``initial_pose``, with the gate's
    settings ``initial_pose_gate``) were scored before the fit and are left out: ``eval-bag``
    measures them.
    Raises DatasetError when the split lacks correct or wrong queries.
    """
    per_query = report['per_query']
    calibration = fit_rows(per_query, config)
    try:
        stored = stored_calibrations(
            read_map(map_dir, load_index=False).read_extra_json('calibration')
        )
    except MapError as exc:
        log.warning('replacing the unreadable calibrations of map %s: %s', map_dir, exc)
        stored = []
    kept = [c.to_json() for c in stored if c.settings != calibration.settings]
    write_extra(map_dir, 'calibration', {'calibrations': [*kept, calibration.to_json()]})
    rescored = [
        {k: v for k, v in q.items() if k not in BEFORE_THE_FIT}
        | {'confidence': calibration.confidence(q['evidence'])}
        for q in per_query
    ]
    return dict(
        {k: v for k, v in report.items() if k not in BEFORE_THE_FIT},
        per_query=rescored,
        calibration=calibration.to_json(),
        open_set=open_set_report(rescored, config.confidence.initial_pose_threshold),
    )


def fit_rows(per_query: list[dict[str, Any]], config: LocalizerConfig) -> Calibration:
    """:meth:`Calibration.fit` on report rows (their ``evidence``; correct = top-1 within
    tolerance), with ``config``'s ridge penalty and query settings."""
    return Calibration.fit(
        [q['evidence'] for q in per_query],
        [q['first_correct_rank'] == 1 for q in per_query],
        config.confidence.calibration_l2,
        fitted_with(config),
    )


def cross_fit(report: dict[str, Any], config: LocalizerConfig, folds: int) -> dict[str, Any]:
    """The report re-scored out of fold: every query's confidence comes from a calibration
    fitted on the other folds only, so the ``open_set`` numbers (ECE included) are measured on
    every query, none of them used to fit the confidence it gets.

    Query row i is in fold (i // ``SPLIT_BLOCK``) % ``folds`` (blocks of consecutive queries:
    neighbouring frames are alike, and sequence evidence needs the past frames); with 2 folds
    the fit and test splits are the two folds. ``report`` comes from
    :func:`vlm_vpr.core.evaluation.run_queries` on all queries (no split), run with
    ``config``. The map's stored calibration is neither used nor changed.
    Raises ConfigError for fewer than 2 folds or more folds than blocks, DatasetError when the
    other folds of one lack correct or wrong queries.
    """
    per_query = report['per_query']
    blocks = -(-len(per_query) // SPLIT_BLOCK)
    if report.get('split') is not None:
        raise ConfigError('cross-fitting uses every query: drop the split (--split)')
    if not 2 <= folds <= blocks:
        raise ConfigError(
            f'cross-fitting needs 2 to {blocks} folds for {len(per_query)} queries '
            f'(blocks of {SPLIT_BLOCK}), got {folds}'
        )
    fold_of = (np.arange(len(per_query)) // SPLIT_BLOCK) % folds
    fits = []
    for k in range(folds):
        try:
            fits.append(fit_rows([q for q, f in zip(per_query, fold_of) if f != k], config))
        except DatasetError as exc:
            raise DatasetError(
                f'cross-fit fold {k + 1} of {folds} (fitted on the others): {exc}'
            ) from exc
    rescored = [
        dict(q, confidence=fits[f].confidence(q['evidence'])) for q, f in zip(per_query, fold_of)
    ]
    return dict(
        report,
        per_query=rescored,
        cross_fit={'folds': folds, 'calibrations': [c.to_json() for c in fits]},
        open_set=open_set_report(rescored, config.confidence.initial_pose_threshold),
    )


def reliability_curve(
    confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS
) -> list[dict[str, float]]:
    """One entry per non-empty equal-width confidence bin: its range, count, mean confidence
    and observed accuracy. confidence [M] float in [0, 1], correct [M] bool."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    which = _bin_of(confidence, bins)
    curve = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            curve.append(
                {
                    'low': b / bins,
                    'high': (b + 1) / bins,
                    'count': int(inside.sum()),
                    'confidence': float(confidence[inside].mean()),
                    'accuracy': float(correct[inside].mean()),
                }
            )
    return curve


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Index [M] of each confidence's equal-width bin in [0, 1] (1.0 in the last)."""
    return np.minimum((confidence * bins).astype(int), bins - 1)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS
) -> float:
    """Count-weighted mean |accuracy - mean confidence| over the reliability bins."""
    curve = reliability_curve(confidence, correct, bins)
    total = sum(b['count'] for b in curve)
    return (
        float(sum(b['count'] * abs(b['accuracy'] - b['confidence']) for b in curve) / total)
        if total
        else 0.0
    )


def ece_if_calibrated(
    confidence: np.ndarray, bins: int = RELIABILITY_BINS, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Median and 90th percentile of the ECE that a perfectly calibrated model with these
    confidences would show on this many queries: outcomes drawn as correct with probability
    equal to the confidence (seeded). An observed ECE inside that range is sampling noise;
    on a few dozen queries the median alone can exceed 0.1."""
    confidence = np.asarray(confidence, float)
    if not len(confidence):
        return 0.0, 0.0
    one_hot = np.eye(bins)[_bin_of(confidence, bins)]  # [M x bins]
    outcomes = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
    # ECE = sum over bins of |sum_i (correct_i - confidence_i)| / M
    ece = np.abs((outcomes - confidence) @ one_hot).sum(axis=1) / len(confidence)
    return float(np.median(ece)), float(np.percentile(ece, 90))


def precision_recall_curve(
    confidence: np.ndarray, correct: np.ndarray, num_in_map: int
) -> np.ndarray:
    """[T x 3] float64 rows (threshold, precision, recall), thresholds descending.

    At threshold c the queries with confidence >= c are accepted; precision = correct accepted
    / accepted, recall = correct accepted / ``num_in_map``. No queries: [0 x 3].
    """
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
    if not len(confidence):
        return np.zeros((0, 3))
    order = np.argsort(-confidence, kind='stable')
    conf, hits = confidence[order], np.cumsum(correct[order])
    last = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])  # end of each tie group
    accepted = last + 1
    return np.stack([conf[last], hits[last] / accepted, hits[last] / max(num_in_map, 1)], axis=1)


def open_set_report(per_query: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Operating point at ``threshold``, recall at 100% precision, ECE and the PR curve.

    Precision is 1.0 when nothing is accepted (no wrong pose was given out). No queries give
    an empty report: counts, recalls, rates and ECE 0, empty reliability and PR curves.

    ``per_query`` rows need ``confidence``, ``truth_xy`` (None = out of map) and
    ``first_correct_rank``, as written by :func:`vlm_vpr.core.evaluation.run_queries` and
    :func:`vlm_vpr.core.bag_eval.evaluate_bags`.
    """
    confidence = np.array([q['confidence'] for q in per_query], dtype=np.float64)
    in_map = np.array([q['truth_xy'] is not None for q in per_query], dtype=bool)
    correct = np.array([q['first_correct_rank'] == 1 for q in per_query], dtype=bool)
    accepted = confidence >= threshold
    curve = precision_recall_curve(confidence, correct, int(in_map.sum()))
    perfect = curve[curve[:, 1] >= 1.0]
    return {
        'threshold': threshold,
        'num_in_map': int(in_map.sum()),
        'num_out_of_map': int((~in_map).sum()),
        'accepted_in_map': fraction((accepted & in_map).sum(), in_map.sum()),
        'false_accept_rate': fraction((accepted & ~in_map).sum(), (~in_map).sum()),
        'wrong_accepts': int((accepted & ~correct).sum()),
        'precision': fraction((accepted & correct).sum(), accepted.sum())
        if accepted.any()
        else 1.0,
        'recall': fraction((accepted & correct).sum(), in_map.sum()),
        'recall_at_full_precision': float(perfect[:, 2].max()) if len(perfect) else 0.0,
        'ece': round(expected_calibration_error(confidence, correct), 4),
        'ece_if_calibrated': [round(v, 4) for v in ece_if_calibrated(confidence)],
        'reliability': reliability_curve(confidence, correct),
        'pr_curve': [[round(float(v), 4) for v in row] for row in curve],
    }


def plot_reliability(reports: list[dict[str, Any]], path: str | Path) -> None:
    """Observed accuracy against predicted confidence, one line per report, plus ECE."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], color='grey', linestyle='--', linewidth=1, label='ideal')
    for report in reports:
        bins = report['open_set']['reliability']
        ax.plot(
            [b['confidence'] for b in bins],
            [b['accuracy'] for b in bins],
            marker='o',
            label=f'{_label(report)} (ECE {report["open_set"]["ece"]:.3f})',
        )
    ax.set_xlabel('predicted confidence')
    ax.set_ylabel('observed accuracy')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_precision_recall(reports: list[dict[str, Any]], path: str | Path) -> None:
    """Precision against recall over thresholds, the operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for report in reports:
        open_set = report['open_set']
        curve = np.array(open_set['pr_curve']).reshape(-1, 3)
        (line,) = ax.plot(curve[:, 2], curve[:, 1], label=_label(report))
        ax.plot(
            open_set['recall'],
            open_set['precision'],
            marker='*',
            markersize=12,
            color=line.get_color(),
            linestyle='none',
        )
    ax.set_xlabel('recall (correct accepted / in-map queries)')
    ax.set_ylabel('precision')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title='* = operating threshold', title_fontsize=7)
    _save(fig, path)


def _label(report: dict[str, Any]) -> str:
    """The plot legend of a report: data set and protocol, or the bag(s)."""
    if 'bags' in report:
        return ' + '.join(Path(bag).name for bag in report['bags'])
    if 'bag' in report:
        return Path(report['bag']).name
    return f'{report["dataset"]}/{report["protocol"]}'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fraction(num: int, den: int) -> float:
    """``num / den`` rounded for reports; 0 when ``den`` is 0."""
    return round(float(num) / float(den), 4) if den else 0.0
