"""Confidence in [0, 1] from the evidence a query leaves behind, via a logistic model.

The model's weights are fitted on a calibration split (``vlm-vpr calibrate``) and stored in
the map as the extra ``calibration``; without one, conservative default weights are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vlm_vpr.core.config import FusionConfig
from vlm_vpr.core.errors import MapError
from vlm_vpr.core.pose_fusion import spatial_spread_m
from vlm_vpr.core.types import Candidate

if TYPE_CHECKING:
    from vlm_vpr.core.map_format import VprMap

EVIDENCE_KEYS = ('top1_score', 'margin', 'spread', 'rerank_agrees')
_DEFAULT_WEIGHTS = {'top1_score': 4.0, 'margin': 60.0, 'spread': -2.0, 'rerank_agrees': 1.0}
_DEFAULT_BIAS = -4.0


def collect_evidence(coarse: list[Candidate], final: list[Candidate],
                     fusion: FusionConfig) -> dict[str, float]:
    """Evidence features of one query.

    top1_score: coarse cosine of the best coarse candidate; margin: its lead over the second;
    spread: RMS distance of the final top candidates from the final best, in units of
    ``fusion.cluster_radius_m``; rerank_agrees: 1 if the final best lies within the cluster
    radius of the coarse best, else 0.
    """
    scores = [c.coarse_score for c in coarse]
    top1 = scores[0] if scores else 0.0
    margin = top1 - scores[1] if len(scores) > 1 else top1
    spread = spatial_spread_m(final, fusion.top_n) / fusion.cluster_radius_m
    agrees = 0.0
    if coarse and final:
        d = math.hypot(final[0].pose.x - coarse[0].pose.x, final[0].pose.y - coarse[0].pose.y)
        agrees = float(d <= fusion.cluster_radius_m)
    return {'top1_score': float(top1), 'margin': float(margin), 'spread': float(spread),
            'rerank_agrees': agrees}


@dataclass(frozen=True)
class Calibration:
    """confidence = sigmoid(bias + sum_k weights[k] * evidence[k])."""

    weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))
    bias: float = _DEFAULT_BIAS
    fitted: bool = False  # False: the default weights, not fitted on this map

    def confidence(self, evidence: dict[str, float]) -> float:
        z = self.bias + sum(w * evidence.get(k, 0.0) for k, w in self.weights.items())
        return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))

    def to_json(self) -> dict:
        return {'weights': self.weights, 'bias': self.bias}

    @staticmethod
    def from_json(data: dict) -> Calibration:
        try:
            weights = {str(k): float(v) for k, v in data['weights'].items()}
            bias = float(data['bias'])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(f'calibration data is malformed ({exc}); run `vlm-vpr calibrate` '
                           'again') from exc
        if not all(np.isfinite(list(weights.values()) + [bias])):
            raise MapError('calibration has non-finite weights; run `vlm-vpr calibrate` again')
        return Calibration(weights, bias, fitted=True)

    @staticmethod
    def from_map(vpr_map: VprMap) -> Calibration:
        data = vpr_map.read_extra_json('calibration')
        return Calibration() if data is None else Calibration.from_json(data)
