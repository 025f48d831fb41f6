"""The robot's odometry pose at a stamp for the node (no ROS imports, so it is tested directly)."""

from __future__ import annotations

import bisect
import threading
from collections import deque

from vlm_vpr.core.types import Pose

MAX_ODOM_SAMPLES = 5000
MAX_ODOM_GAP_NS = 500_000_000  # an odometry sample further than this from a stamp is unusable


class OdometryTrack:
    """Recent odometry poses (the robot in the odometry frame) by stamp; thread-safe (filled
    by the odometry callback, read by the worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stamps: deque[int] = deque(maxlen=MAX_ODOM_SAMPLES)
        self._poses: deque[Pose] = deque(maxlen=MAX_ODOM_SAMPLES)

    def add(self, stamp_ns: int, pose: Pose) -> bool:
        """Store one sample; False (not stored) for one with NaN or infinite values, so that
        the motion across it is unknown, as for a TF transform with them."""
        if not pose.is_finite:
            return False
        with self._lock:
            if self._stamps and stamp_ns < self._stamps[-1]:  # time went back (bag loop)
                self._stamps.clear()
                self._poses.clear()
            self._stamps.append(stamp_ns)
            self._poses.append(pose)
        return True

    def pose_at(self, stamp_ns: int) -> Pose | None:
        """The sample nearest ``stamp_ns``; None without one within MAX_ODOM_GAP_NS."""
        with self._lock:
            return self._nearest(stamp_ns)

    def _nearest(self, stamp_ns: int) -> Pose | None:
        i = bisect.bisect_left(self._stamps, stamp_ns)
        near = [j for j in (i - 1, i) if 0 <= j < len(self._stamps)]
        if not near:
            return None
        j = min(near, key=lambda k: abs(self._stamps[k] - stamp_ns))
        return self._poses[j] if abs(self._stamps[j] - stamp_ns) <= MAX_ODOM_GAP_NS else None
