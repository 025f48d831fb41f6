"""Confidence in [0, 1] from the evidence a query leaves behind, via a logistic model.

The model is fitted on a calibration split of posed images (``vlm-vpr calibrate``) and stored
in the map as the extra ``calibration``; without one, conservative default weights are used.
A calibration is only valid for the query settings it was fitted with (re-ranker chain and
sequence length, recorded in ``fitted_with``); with other settings the defaults are used.
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


@dataclass(frozen=True)
class Calibration:
    """confidence = sigmoid(bias + sum_k weights[k] * evidence[k]); a missing key counts 0."""

    weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))
    bias: float = _DEFAULT_BIAS
    fitted: bool = False  # False: the default weights, not fitted on this map
    settings: dict[str, Any] = field(default_factory=dict)  # fitted_with() of the fit

    def confidence(self, evidence: dict[str, float]) -> float:
        z = self.bias + sum(w * evidence.get(k, 0.0) for k, w in self.weights.items())
        return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))

    def to_json(self) -> dict[str, Any]:
        return {'weights': self.weights, 'bias': self.bias, 'fitted_with': self.settings}

    @staticmethod
    def from_json(data: dict) -> Calibration:
        try:
            weights = {str(k): float(v) for k, v in data['weights'].items()}
            bias = float(data['bias'])
            settings = dict(data.get('fitted_with', {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(
                f'calibration data is malformed ({exc}); run `vlm-vpr calibrate` again'
            ) from exc
        if not all(np.isfinite(list(weights.values()) + [bias])):
            raise MapError('calibration has non-finite weights; run `vlm-vpr calibrate` again')
        return Calibration(weights, bias, fitted=True, settings=settings)

    @staticmethod
    def from_map(vpr_map: VprMap, config: LocalizerConfig | None = None) -> Calibration:
        """The map's calibration; the defaults if it has none or ``config`` differs from it."""
        data = vpr_map.read_extra_json('calibration')
        if data is None:
            return Calibration()
        calibration = Calibration.from_json(data)
        if config is not None and calibration.settings != fitted_with(config):
            log.warning(
                'the calibration of map %s was fitted with %s, the query uses %s: '
                'using default confidence weights; run `vlm-vpr calibrate` with these '
                'settings',
                vpr_map.path,
                calibration.settings,
                fitted_with(config),
            )
            return Calibration()
        return calibration

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
        Constant features get weight 0. Raises DatasetError without both outcomes.
        """
        labels = np.asarray(correct, dtype=np.float64)
        if len(evidence) != len(labels) or not 0 < labels.sum() < len(labels):
            raise DatasetError(
                'calibration needs samples of both outcomes (correct and wrong); '
                'use more posed images or hold out part of the map'
            )
        keys = sorted({k for e in evidence for k in e})
        x = np.array([[e.get(k, 0.0) for k in keys] for e in evidence], dtype=np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        used = std > 1e-12
        xs = np.hstack([np.ones((len(x), 1)), (x[:, used] - mean[used]) / std[used]])
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
        raw = np.zeros(len(keys))
        raw[used] = beta[1:] / std[used]
        bias = float(beta[0] - raw[used] @ mean[used])
        return Calibration(
            {k: float(w) for k, w in zip(keys, raw)},
            bias,
            fitted=True,
            settings=dict(settings or {}),
        )
