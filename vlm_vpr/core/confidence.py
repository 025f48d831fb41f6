"""Confidence in [0, 1] from the evidence a query leaves behind, via a logistic model.

The model is fitted on a calibration split of posed images (``vlm-vpr calibrate``) and stored
in the map as the extra ``calibration``; without one, conservative default weights are used.
A calibration is only valid for the query settings it was fitted with (re-ranker chain and
sequence length, recorded in ``fitted_with``): the map keeps one per settings, side by side
(``{"calibrations": [...]}``), and a query with settings none was fitted for uses the defaults.

Two rules keep a fit on a small calibration split from learning noise:

- Evidence of known meaning keeps its direction (``EVIDENCE_SIGNS``): a larger margin never
  lowers the confidence, a larger spread never raises it. A weight that comes out the wrong
  way drops its feature and the model is refitted.
- With sequence evidence, only results *on track* (the winner continues the path of the past
  frames' winners: ``track_consistency`` >= 0.5 and ``progress_error`` <= 0.5; the camera
  has not moved a consistency radius past the map's edge with the winner held there:
  ``edge_overrun`` < 1; and a track found again after it was lost lies within reach of the
  camera since the last on-track winner: ``beyond_reach`` <= 0.5) get the logistic model.
  Every other result (the sequence still filling, a jump, a winner stuck at the map's edge)
  gets one number: the smoothed accuracy of such results in the calibration split.
  A linear model would let one strong feature (a large sequence margin by aliasing, say)
  outvote all the evidence that the place is not on the map.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_vpr.core.config import FusionConfig, LocalizerConfig
from vlm_vpr.core.errors import DatasetError, MapError
from vlm_vpr.core.pose_fusion import spatial_spread_m
from vlm_vpr.core.types import Candidate

if TYPE_CHECKING:
    from vlm_vpr.core.map_format import VprMap

log = logging.getLogger(__name__)

# Single-frame weights fitted (Calibration.fit, l2 = 1) on the pooled queries of the five shared
# protocols (corridor, campus_loop, three Gardens Point) with the middle fifth of each map held
# out, with the default dense-rootsift features; refit them when those defaults change. On
# each protocol they accept no out-of-map query at 0.9, also when that protocol is left out.
_DEFAULT_WEIGHTS = {'top1_score': 22.1, 'margin': 14.4}
_DEFAULT_BIAS = -11.9

# +1: more of it means a correct result is more likely; -1: less likely. Fitted weights keep
# these directions; evidence not listed here (re-rankers' raw scores) may take either.
EVIDENCE_SIGNS = {
    'top1_score': 1,
    'margin': 1,
    'spread': -1,
    'rerank_agrees': 1,
    'geometric_inliers': 1,
    'seq_score': 1,
    'seq_margin': 1,
    'temporal_consistency': 1,
    'track_consistency': 1,
    'seq_fill': 1,
    'hubness': -1,
    'progress_error': -1,
    'room_ahead': 1,
    'edge_overrun': -1,
    'beyond_reach': -1,
}
ON_TRACK_MIN_CONSISTENCY = 0.5  # track_consistency at or above this ...
ON_TRACK_MAX_PROGRESS_ERROR = 0.5  # ... and progress_error at or below this ...
ON_TRACK_MAX_EDGE_OVERRUN = 1.0  # ... and edge_overrun below this ...
ON_TRACK_MAX_BEYOND_REACH = 0.5  # ... and beyond_reach at or below this: on track


def collect_evidence(
    coarse: list[Candidate], final: list[Candidate], fusion: FusionConfig
) -> dict[str, float]:
    """Evidence features of one query, each a float (absent re-rankers add no key).

    top1_score: coarse cosine of the final best candidate.
    margin: its coarse cosine minus the best coarse cosine of a candidate of another place
      (farther than ``fusion.cluster_radius_m`` from it; else the weakest candidate's).
    spread: RMS distance of the final top ``fusion.top_n`` from the final best, in cluster radii.
    rerank_agrees: 1 if the final best lies within the cluster radius of the coarse best.
    geometric_inliers: log(1 + RANSAC inliers) of the final best, when the geometric
      re-ranker ran; other re-rankers' raw scores of the final best are copied by name.
    """
    if not final:
        return {'top1_score': 0.0, 'margin': 0.0, 'spread': 0.0, 'rerank_agrees': 0.0}
    best = final[0]
    pool = coarse or final
    elsewhere = [c.coarse_score for c in pool if _distance(c, best) > fusion.cluster_radius_m]
    rival = max(elsewhere) if elsewhere else min(c.coarse_score for c in pool)
    evidence = {
        'top1_score': float(best.coarse_score),
        'margin': float(best.coarse_score - rival),
        'spread': spatial_spread_m(final, fusion.top_n) / fusion.cluster_radius_m,
        'rerank_agrees': float(
            bool(coarse) and _distance(coarse[0], best) <= fusion.cluster_radius_m
        ),
    }
    for key, value in best.evidence.items():
        evidence[key] = math.log1p(max(0.0, value)) if key == 'geometric_inliers' else value
    return {k: float(v) for k, v in evidence.items()}


def _distance(a: Candidate, b: Candidate) -> float:
    return math.hypot(a.pose.x - b.pose.x, a.pose.y - b.pose.y)


def fitted_with(config: LocalizerConfig) -> dict[str, Any]:
    """The query settings a calibration depends on (they decide which evidence exists)."""
    return {'rerank.chain': list(config.rerank.chain), 'sequence.length': config.sequence.length}


def on_track(evidence: dict[str, float]) -> bool:
    """Whether a sequence result's winner continues the path of the past frames' winners."""
    return (
        evidence.get('track_consistency', 0.0) >= ON_TRACK_MIN_CONSISTENCY
        and evidence.get('progress_error', 1.0) <= ON_TRACK_MAX_PROGRESS_ERROR
        and evidence.get('edge_overrun', 0.0) < ON_TRACK_MAX_EDGE_OVERRUN
        and evidence.get('beyond_reach', 0.0) <= ON_TRACK_MAX_BEYOND_REACH
    )


@dataclass(frozen=True)
class Calibration:
    """confidence = sigmoid(bias + sum_k weights[k] * evidence[k]); a missing key counts 0, a
    non-finite logit (NaN or infinite evidence) gives 0 with a warning.

    off_track: the confidence of sequence results that are not :func:`on_track` (evidence with
    ``track_consistency``); None = the logistic model for them too.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))
    bias: float = _DEFAULT_BIAS
    fitted: bool = False  # False: the default weights, not fitted on this map
    settings: dict[str, Any] = field(default_factory=dict)  # fitted_with() of the fit
    off_track: float | None = None

    def confidence(self, evidence: dict[str, float]) -> float:
        if (
            self.off_track is not None
            and 'track_consistency' in evidence
            and not on_track(evidence)
        ):
            return self.off_track
        z = self.bias + sum(w * evidence.get(k, 0.0) for k, w in self.weights.items())
        if not math.isfinite(z):  # min(50, nan) is 50: NaN evidence would give confidence ~1
            bad = sorted(k for k in self.weights if not math.isfinite(evidence.get(k, 0.0)))
            log.warning(
                'confidence 0: the calibration logit is %s (non-finite evidence: %s)',
                z,
                ', '.join(bad) or 'none; the weighted sum overflowed',
            )
            return 0.0
        return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))

    def to_json(self) -> dict[str, Any]:
        return {
            'weights': self.weights,
            'bias': self.bias,
            'off_track': self.off_track,
            'fitted_with': self.settings,
        }

    @staticmethod
    def from_json(data: dict) -> Calibration:
        try:
            weights = {str(k): float(v) for k, v in data['weights'].items()}
            bias = float(data['bias'])
            off_track = data.get('off_track')
            off_track = None if off_track is None else float(off_track)
            settings = dict(data.get('fitted_with', {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(
                f'calibration data is malformed ({exc}); run `vlm-vpr calibrate` again'
            ) from exc
        if not all(np.isfinite(list(weights.values()) + [bias])):
            raise MapError('calibration has non-finite weights; run `vlm-vpr calibrate` again')
        if off_track is not None and not 0.0 <= off_track <= 1.0:
            raise MapError('calibration off_track is not in [0, 1]; run `vlm-vpr calibrate` again')
        return Calibration(weights, bias, fitted=True, settings=settings, off_track=off_track)

    @staticmethod
    def from_map(vpr_map: VprMap, config: LocalizerConfig) -> Calibration:
        """The map's calibration fitted with ``config``'s query settings; else the defaults."""
        stored = stored_calibrations(vpr_map.read_extra_json('calibration'))
        wanted = fitted_with(config)
        for calibration in stored:
            if calibration.settings == wanted:
                return calibration
        if stored:
            log.warning(
                'map %s has calibrations fitted with %s, the query uses %s: using default '
                'confidence weights; run `vlm-vpr calibrate` with these settings',
                vpr_map.path,
                [c.settings for c in stored],
                wanted,
            )
        else:
            log.warning(
                'map %s has no confidence calibration yet: default weights (`vlm-vpr '
                'calibrate` fits one on posed queries of this map)',
                vpr_map.path,
            )
        return Calibration()

    @staticmethod
    def fit(
        evidence: list[dict[str, float]],
        correct: list[bool] | np.ndarray,
        l2: float = 1.0,
        settings: dict[str, Any] | None = None,
    ) -> Calibration:
        """Logistic regression of ``correct`` on the evidence (keys: union over samples).

        Features are standardised, fitted by Newton's method with a ridge penalty ``l2`` on
        the standardised weights (the bias is not penalised), and mapped back to raw units.
        Constant features get weight 0, and so do features whose weight would go against
        ``EVIDENCE_SIGNS`` (dropped one at a time, the largest offender first, then refitted).
        With sequence evidence, the model is fitted on the :func:`on_track` samples and
        ``off_track`` = (correct + 1) / (count + 2) of the others whose sequence was full
        (``seq_fill`` 1; all others if none was): the first L - 1 frames after a start or a
        reset cannot be on track yet, are over-represented in a short calibration traversal
        and are as often right as single frames are, which is not what an off-track result is
        (at run time they get the off-track confidence too). If the on-track samples lack
        either outcome, one model serves all (logged as a warning, as is an off-track
        confidence from no off-track sample). Raises DatasetError without both outcomes.
        """
        labels = np.asarray(correct, dtype=np.float64)
        if len(evidence) != len(labels) or not 0 < labels.sum() < len(labels):
            raise DatasetError(
                'calibration needs samples of both outcomes (correct and wrong); '
                'use more posed queries, including ones the map cannot answer (a drive that '
                'leaves the mapped area, or a map stretch held out: --holdout-map-range)'
            )
        off_track = None
        if all('track_consistency' in e for e in evidence):
            track = np.array([on_track(e) for e in evidence])
            if 0 < labels[track].sum() < track.sum():
                settled = ~track & np.array([e.get('seq_fill', 1.0) >= 1.0 for e in evidence])
                off = labels[settled] if settled.any() else labels[~track]
                if not len(off):
                    log.warning(
                        'the calibration split has no off-track result: off-track results '
                        'will get confidence 0.5; calibrate on a traversal that leaves the '
                        'map (--holdout-map-range)'
                    )
                off_track = float((off.sum() + 1.0) / (len(off) + 2.0))
                evidence = [e for e, t in zip(evidence, track) if t]
                labels = labels[track]
            else:
                log.warning(
                    'on-track results in the calibration split: %d, correct: %d; the on-track '
                    'rule needs both outcomes, so it is not applied: one logistic model serves '
                    'all results and a consistent track at the wrong place is judged by its '
                    'scores alone; calibrate on more posed queries',
                    track.sum(),
                    labels[track].sum(),
                )
        keys = sorted({k for e in evidence for k in e})
        x = np.array([[e.get(k, 0.0) for k in keys] for e in evidence], dtype=np.float64)
        signs = np.array([EVIDENCE_SIGNS.get(k, 0) for k in keys])
        used = x.std(axis=0) > 1e-12
        while True:
            raw, bias, scaled = _fit_logistic(x[:, used], labels, l2)
            wrong = signs[used] * raw < 0
            if not wrong.any():
                break
            worst = np.flatnonzero(used)[np.argmax(np.where(wrong, np.abs(scaled), -1.0))]
            used[worst] = False
        weights = np.zeros(len(keys))
        weights[used] = raw
        return Calibration(
            {k: float(w) for k, w in zip(keys, weights)},
            bias,
            fitted=True,
            settings=dict(settings or {}),
            off_track=off_track,
        )


def stored_calibrations(data: Any) -> list[Calibration]:
    """The calibrations of a map's ``calibration`` extra (None: none). Reads both the current
    ``{"calibrations": [...]}`` and the single calibration that maps stored before it."""
    if data is None:
        return []
    single = isinstance(data, dict) and 'weights' in data
    entries = [data] if single else data.get('calibrations') if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise MapError(
            'calibration data is malformed (no list of calibrations); '
            'run `vlm-vpr calibrate` again'
        )
    return [Calibration.from_json(entry) for entry in entries]


def _fit_logistic(
    x: np.ndarray, labels: np.ndarray, l2: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Ridge logistic regression on standardised columns of ``x`` [M x F] (non-constant).
    Returns (weights [F] in raw units, bias, weights [F] on the standardised columns)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    xs = np.hstack([np.ones((len(x), 1)), (x - mean) / std])
    beta = np.zeros(xs.shape[1])
    penalty = np.full(xs.shape[1], float(l2))
    penalty[0] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ beta, -50, 50)))
        gradient = xs.T @ (p - labels) + penalty * beta
        hessian = (xs.T * (p * (1 - p) + 1e-9)) @ xs + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-9:
            break
    raw = beta[1:] / std
    return raw, float(beta[0] - raw @ mean), beta[1:]
