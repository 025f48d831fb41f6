"""Pure-Python pieces of the node's temporal logic: odometry between frames and the
/initialpose gate (no ROS imports, so they are tested directly)."""

from __future__ import annotations

import bisect
import math
from collections import deque

from vlm_vpr.core.types import Pose
from vlm_vpr.ros.params import InitialPoseConfig

MAX_ODOM_SAMPLES = 5000
MAX_ODOM_GAP_NS = 500_000_000  # an odometry sample further than this from a stamp is unusable


class OdometryTrack:
    """Recent planar odometry poses (x, y, yaw in the odometry frame) by stamp."""

    def __init__(self) -> None:
        self._stamps: deque[int] = deque(maxlen=MAX_ODOM_SAMPLES)
        self._poses: deque[tuple[float, float, float]] = deque(maxlen=MAX_ODOM_SAMPLES)

    def add(self, stamp_ns: int, x: float, y: float, yaw_rad: float) -> None:
        if self._stamps and stamp_ns < self._stamps[-1]:  # time went back (bag loop): restart
            self._stamps.clear()
            self._poses.clear()
        self._stamps.append(stamp_ns)
        self._poses.append((x, y, yaw_rad))

    def motion(self, from_ns: int, to_ns: int) -> Pose | None:
        """Planar motion of the robot from ``from_ns`` to ``to_ns``, in the robot's frame at
        ``from_ns``; None without odometry near both stamps."""
        a, b = self._at(from_ns), self._at(to_ns)
        if a is None or b is None:
            return None
        c, s = math.cos(a[2]), math.sin(a[2])
        dx, dy = b[0] - a[0], b[1] - a[1]
        return Pose.from_yaw(c * dx + s * dy, -s * dx + c * dy, _wrap(b[2] - a[2]))

    def _at(self, stamp_ns: int) -> tuple[float, float, float] | None:
        i = bisect.bisect_left(self._stamps, stamp_ns)
        near = [j for j in (i - 1, i) if 0 <= j < len(self._stamps)]
        if not near:
            return None
        j = min(near, key=lambda k: abs(self._stamps[k] - stamp_ns))
        return self._poses[j] if abs(self._stamps[j] - stamp_ns) <= MAX_ODOM_GAP_NS else None


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
    if math.hypot(pose.x - expected.x, pose.y - expected.y) > config.max_distance_m + slack:
        return False
    if pose.yaw_known and expected.yaw_known:
        turn = abs(_wrap(pose.yaw_rad - expected.yaw_rad))
        return math.degrees(turn) <= config.max_yaw_deg
    return True


def _wrap(angle_rad: float) -> float:
    return math.atan2(math.sin(angle_rad), math.cos(angle_rad))
