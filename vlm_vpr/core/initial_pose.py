"""The /initialpose gate (AMCL): publish a pose prior only once N consecutive confident frames
agree on the place. The ROS node runs it on live frames, ``vlm-vpr eval-bag`` on a bag's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.types import Pose, wrap_angle


@dataclass(frozen=True)
class InitialPoseConfig:
    """Gate for publishing /initialpose (AMCL): one publication per arming. The confidence each
    agreeing frame needs is LocalizerConfig's ``confidence.initial_pose_threshold``."""

    enabled: bool = False  # publish /initialpose once the gate passes; re-armed by a service
    consecutive_frames: int = 3  # N: frames in a row that must agree on the place
    max_distance_m: float = 5.0  # D: consecutive poses agree within this distance (after odom)
    max_yaw_deg: float = 30.0  # Y: ... and within this yaw (skipped where yaw is unknown)

    def __post_init__(self) -> None:
        if not 1 <= self.consecutive_frames <= 100:
            raise ConfigError('initial_pose.consecutive_frames must be in [1, 100]')
        if not self.max_distance_m > 0:
            raise ConfigError('initial_pose.max_distance_m must be > 0')
        if not 0 < self.max_yaw_deg <= 180:
            raise ConfigError('initial_pose.max_yaw_deg must be in (0, 180]')


class InitialPoseGate:
    """Passes once N consecutive confident frames agree on the place, then stays shut until
    :meth:`rearm`.

    Frames agree when each pose lies within D metres and Y degrees of the previous one moved
    by the odometry between them (without odometry: of the previous pose itself, so D must
    cover the motion between frames). A frame below the confidence threshold, or one that
    disagrees, restarts the count.
    """

    def __init__(self) -> None:
        self.armed = True
        self._run: list[Pose] = []

    def rearm(self) -> None:
        self.armed = True
        self._run.clear()

    def update(
        self,
        pose: Pose,
        confidence: float,
        motion: Pose | None,
        config: InitialPoseConfig,
        threshold: float,
    ) -> bool:
        """True when this frame completes the gate (publish /initialpose now)."""
        if not self.armed:
            return False
        if confidence < threshold:
            self._run.clear()
            return False
        if self._run and not _agree(self._run[-1], pose, motion, config):
            self._run.clear()
        self._run.append(pose)
        if len(self._run) < config.consecutive_frames:
            return False
        self.armed = False
        self._run.clear()
        return True

    @property
    def run_length(self) -> int:
        return len(self._run)


def _agree(previous: Pose, pose: Pose, motion: Pose | None, config: InitialPoseConfig) -> bool:
    expected, slack = previous, 0.0
    if motion is not None and previous.yaw_known:
        c, s = math.cos(previous.yaw_rad), math.sin(previous.yaw_rad)
        expected = Pose.from_yaw(
            previous.x + c * motion.x - s * motion.y,
            previous.y + s * motion.x + c * motion.y,
            previous.yaw_rad + motion.yaw_rad,
        )
    elif motion is not None:  # heading unknown: only the distance travelled is known
        slack = math.hypot(motion.x, motion.y)
    # written so that a NaN anywhere (in a pose or the motion) means "do not agree"
    if not math.hypot(pose.x - expected.x, pose.y - expected.y) <= config.max_distance_m + slack:
        return False
    if pose.yaw_known and expected.yaw_known:
        turn = abs(wrap_angle(pose.yaw_rad - expected.yaw_rad))
        return math.degrees(turn) <= config.max_yaw_deg
    return True
