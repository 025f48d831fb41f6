"""Plain data passed between stages. Arrays document their shape, dtype and normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LocalFeatures:
    """Dense local descriptors of one image.

    descriptors: [H x W x D] float32, each D-vector L2-normalised (a grid of patches).
    valid: [H x W] bool or None; False marks descriptors to leave out (e.g. textureless patches).
    """

    descriptors: np.ndarray
    valid: np.ndarray | None = None

    @property
    def flat(self) -> np.ndarray:
        """[M x D] float32: the valid descriptors (all of them when ``valid`` is None)."""
        flat = self.descriptors.reshape(-1, self.descriptors.shape[-1])
        return flat if self.valid is None else flat[self.valid.reshape(-1)]


@dataclass(frozen=True)
class Pose:
    """A pose in the map frame (REP-103: metres, radians; quaternion x, y, z, w)."""

    x: float
    y: float
    z: float = 0.0
    qx: float = 0.0
    qy: float = 0.0
    qz: float = 0.0
    qw: float = 1.0
    yaw_known: bool = True

    @property
    def is_finite(self) -> bool:
        """No NaN or infinite value (a broken driver or TF publisher can send them)."""
        return all(
            math.isfinite(v) for v in (self.x, self.y, self.z, self.qx, self.qy, self.qz, self.qw)
        )

    @property
    def yaw_rad(self) -> float:
        return math.atan2(
            2.0 * (self.qw * self.qz + self.qx * self.qy),
            1.0 - 2.0 * (self.qy * self.qy + self.qz * self.qz),
        )

    @staticmethod
    def from_yaw(x: float, y: float, yaw_rad: float | None, z: float = 0.0) -> Pose:
        if yaw_rad is None or not math.isfinite(yaw_rad):
            return Pose(x, y, z, yaw_known=False)
        return Pose(x, y, z, 0.0, 0.0, math.sin(yaw_rad / 2), math.cos(yaw_rad / 2))


def planar_motion(a: Pose, b: Pose) -> Pose:
    """The motion from pose ``a`` to ``b`` (both in one fixed frame, such as odom), in the
    frame of ``a``: forward, left, turn."""
    yaw = a.yaw_rad
    c, s = math.cos(yaw), math.sin(yaw)
    dx, dy = b.x - a.x, b.y - a.y
    return Pose.from_yaw(c * dx + s * dy, -s * dx + c * dy, wrap_angle(b.yaw_rad - yaw))


@dataclass
class Candidate:
    """One map image proposed for a query; ``score`` is the current ranking score."""

    map_index: int
    image_name: str
    pose: Pose
    coarse_score: float  # inner product of global descriptors
    score: float  # score after the last re-ranker (equals coarse_score before re-ranking)
    evidence: dict[str, float] = field(default_factory=dict)  # per re-ranker raw scores


@dataclass
class LocalizationResult:
    """The pose prior for one query image.

    covariance: [6 x 6] float64 over (x, y, z, roll, pitch, yaw), row-major, as in
    geometry_msgs/PoseWithCovariance; never zero on the diagonal, never NaN.
    """

    candidates: list[Candidate]
    pose: Pose
    covariance: np.ndarray
    confidence: float  # in [0, 1]
    timing_ms: dict[str, float] = field(default_factory=dict)  # per stage
    notes: list[str] = field(default_factory=list)  # diagnosed fallbacks (VLM timeout, ...)
    evidence: dict[str, float] = field(default_factory=dict)  # inputs to the confidence
    descriptor: np.ndarray | None = None  # [D] float32 global descriptor of the query


def wrap_angle(angle_rad: float) -> float:
    """The angle in (-pi, pi]."""
    return math.atan2(math.sin(angle_rad), math.cos(angle_rad))
