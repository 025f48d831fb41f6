"""Fuse the best candidates' map poses into one pose with a covariance."""

from __future__ import annotations

import math

import numpy as np

from vlm_vpr.core.config import FusionConfig
from vlm_vpr.core.types import Candidate, Pose

_Z_STD_M = 1.0  # we localise in the plane: z, roll and pitch get wide, finite variances
_TILT_STD_RAD = 0.5


def fuse_poses(candidates: list[Candidate], config: FusionConfig) -> tuple[Pose, np.ndarray]:
    """(pose, covariance [6 x 6] float64 over x, y, z, roll, pitch, yaw).

    Candidates within ``cluster_radius_m`` of the best one (among the first ``top_n``) are
    averaged with weights proportional to their score above the weakest one considered; the
    covariance is their weighted spread plus the configured floor, so scattered candidates
    give a wide covariance. Yaw is a circular mean over candidates with a known yaw.
    """
    if not candidates:
        raise ValueError('fuse_poses needs at least one candidate')
    considered = candidates[: config.top_n]
    best = considered[0].pose
    xy = np.array([[c.pose.x, c.pose.y] for c in considered])
    scores = np.array([c.score for c in considered], dtype=np.float64)
    close = np.hypot(*(xy - xy[0]).T) <= config.cluster_radius_m
    weights = np.where(close, scores - scores.min() + 1e-3, 0.0)
    weights /= weights.sum()

    mean_xy = weights @ xy
    z = float(weights @ np.array([c.pose.z for c in considered]))
    centred = xy - mean_xy
    cov_xy = (weights[:, None] * centred).T @ centred + np.eye(2) * config.min_std_xy_m**2

    known = np.array([c.pose.yaw_known for c in considered]) & close
    if known.any():
        yaws = np.array([c.pose.yaw_rad for c in considered])[known]
        w = weights[known] / weights[known].sum()
        s, co = float(w @ np.sin(yaws)), float(w @ np.cos(yaws))
        yaw = math.atan2(s, co)
        resultant = min(1.0, math.hypot(s, co))
        circular_var = -2.0 * math.log(max(resultant, 1e-9))
        var_yaw = min(circular_var + config.min_std_yaw_rad**2, config.unknown_yaw_std_rad**2)
        pose = Pose.from_yaw(float(mean_xy[0]), float(mean_xy[1]), yaw, z)
    else:
        var_yaw = config.unknown_yaw_std_rad**2
        pose = Pose(
            float(mean_xy[0]),
            float(mean_xy[1]),
            z,
            best.qx,
            best.qy,
            best.qz,
            best.qw,
            yaw_known=False,
        )

    covariance = np.zeros((6, 6))
    covariance[:2, :2] = cov_xy
    covariance[2, 2] = _Z_STD_M**2
    covariance[3, 3] = covariance[4, 4] = _TILT_STD_RAD**2
    covariance[5, 5] = var_yaw
    return pose, covariance


def spatial_spread_m(candidates: list[Candidate], top_n: int) -> float:
    """RMS distance of the first ``top_n`` candidates from the best one (map units)."""
    xy = np.array([[c.pose.x, c.pose.y] for c in candidates[:top_n]])
    if len(xy) < 2:
        return 0.0
    return float(np.sqrt(((xy[1:] - xy[0]) ** 2).sum(axis=1).mean()))
