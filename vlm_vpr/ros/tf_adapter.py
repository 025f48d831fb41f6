"""TF for the node: where the camera sits on the robot, and how the robot moved between frames.

tf2_ros is not published as a PyPI wheel, so machines without a ROS install use the fixed
``camera_offset.*`` parameters and ``odom_topic`` (or frame order); :class:`TfTree` is the only
place that touches tf2. The rest reads TF through a :data:`Lookup` (``TfTree.lookup`` on a
robot, a stand-in function in the tests), so it runs and is tested here.

- Camera mount: the pose of ``base_frame`` in the camera frame (planar part: x, y, z and yaw),
  used to turn the localised camera pose into the robot's pose: :class:`TfOffset` (TF
  ``base_frame -> camera_frame``) or :class:`FixedOffset` (``camera_offset.*``).
- Motion: :class:`TfOdometry`, the robot's pose at an image stamp from TF
  ``odom_frame -> base_frame``, whose planar motion between frames feeds sequence evidence and
  the ``/initialpose`` gate (as ``odom_topic`` gives it from nav_msgs/Odometry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from vlm_vpr.core.errors import VprError
from vlm_vpr.core.types import Pose
from vlm_vpr.ros.params import CameraOffsetConfig

Transform = tuple[float, float, float, float, float, float, float]  # x, y, z, qx, qy, qz, qw
# (target_frame, source_frame, stamp_ns or None for the latest) -> the pose of source_frame in
# target_frame; raises TransformUnavailable when TF cannot tell
Lookup = Callable[[str, str, int | None], Transform]


class TransformUnavailable(VprError):
    """TF has no transform between the two frames (yet, or at that time). ``reason``: the
    node's /diagnostics counter."""

    reason = 'no_transform'


class OffsetSource(Protocol):
    def base_in_camera(self, camera_frame: str) -> Pose:
        """The pose of the base frame in ``camera_frame``; TransformUnavailable if unknown."""


TF_CACHE_S = 60.0  # TF history kept: the motion between frames further apart is unknown
# a stamped lookup waits this long for TF to reach the stamp (odometry TF published after the
# image): a few periods of a 20-50 Hz odometry; a missing transform costs a frame this much
TF_WAIT_S = 0.1


class TfTree:
    """The node's tf2_ros buffer and listener (one for the camera mount and the motion)."""

    def __init__(self, node: Any) -> None:
        import tf2_ros
        from rclpy.duration import Duration

        self._buffer = tf2_ros.Buffer(cache_time=Duration(seconds=TF_CACHE_S))
        self._listener = tf2_ros.TransformListener(self._buffer, node)
        self._errors = (
            tf2_ros.LookupException,
            tf2_ros.ConnectivityException,
            tf2_ros.ExtrapolationException,
            tf2_ros.InvalidArgumentException,
        )

    def lookup(self, target: str, source: str, stamp_ns: int | None) -> Transform:
        """Called from the node's worker thread, never an executor's: while a stamped lookup
        waits (``TF_WAIT_S``), the executor's threads keep filling the buffer."""
        from rclpy.duration import Duration
        from rclpy.time import Time

        when = Time() if stamp_ns is None else Time(nanoseconds=stamp_ns)
        wait = Duration(seconds=0.0 if stamp_ns is None else TF_WAIT_S)
        try:
            t = self._buffer.lookup_transform(target, source, when, timeout=wait).transform
        except self._errors as exc:
            raise TransformUnavailable(f'no TF from {target!r} to {source!r} ({exc})') from exc
        p, q = t.translation, t.rotation
        return p.x, p.y, p.z, q.x, q.y, q.z, q.w

    def close(self) -> None:
        """Stop listening (the node's cleanup): the /tf subscriptions go."""
        self._listener.unregister()


def tf_available() -> bool:
    """True where tf2_ros can be imported (a ROS install)."""
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


def finite_lookup(lookup: Lookup, target: str, source: str, stamp_ns: int | None) -> Transform:
    """``lookup(target, source, stamp_ns)``; a transform with NaN or infinite values is
    TransformUnavailable too (a broken publisher), so it never reaches a pose."""
    transform = lookup(target, source, stamp_ns)
    if not Pose(*transform).is_finite:
        raise TransformUnavailable(f'TF from {target!r} to {source!r} is not finite: {transform}')
    return transform


def base_in_camera_from_offset(offset: CameraOffsetConfig) -> Pose:
    """Invert the camera's pose in the base frame (planar) into the base's pose in the camera."""
    yaw = math.radians(offset.yaw_deg)
    c, s = math.cos(yaw), math.sin(yaw)
    return Pose.from_yaw(
        -(c * offset.x_m + s * offset.y_m), -(-s * offset.x_m + c * offset.y_m), -yaw, -offset.z_m
    )


class FixedOffset:
    """The ``camera_offset.*`` parameters; ``offset`` may be replaced while running."""

    def __init__(self, offset: CameraOffsetConfig) -> None:
        self.offset = offset

    def base_in_camera(self, camera_frame: str) -> Pose:
        return base_in_camera_from_offset(self.offset)


class TfOffset:
    """The latest TF ``base_frame -> camera_frame`` (the camera is taken as rigidly mounted).

    ``camera_frame`` should be x-forward (camera_link), not an optical frame; it may be pitched
    or rolled: the camera's pose in the base frame is levelled (x, y, z and the heading of its
    x axis, see :func:`mount_from_transform`) before it is inverted.
    """

    def __init__(self, lookup: Lookup, base_frame: str) -> None:
        self.lookup = lookup
        self.base_frame = base_frame

    def base_in_camera(self, camera_frame: str) -> Pose:
        try:
            transform = finite_lookup(self.lookup, self.base_frame, camera_frame, None)
        except TransformUnavailable as exc:
            raise TransformUnavailable(
                f'{exc}; publish the camera mount (robot_state_publisher) or set use_tf: false '
                'and camera_offset.*'
            ) from exc
        return base_in_camera_from_offset(mount_from_transform(*transform))


def mount_from_transform(
    x: float, y: float, z: float, qx: float, qy: float, qz: float, qw: float
) -> CameraOffsetConfig:
    """The planar camera mount from the camera's pose in the base frame: its position and the
    heading of its x axis (the yaw of a yaw-pitch-roll rotation, whatever the pitch and roll)."""
    yaw = Pose(x, y, z, qx, qy, qz, qw).yaw_rad
    return CameraOffsetConfig(x_m=x, y_m=y, z_m=z, yaw_deg=math.degrees(yaw))


class TfOdometry:
    """The robot's pose in ``odom_frame`` at a stamp, from TF ``odom_frame -> base_frame``."""

    def __init__(self, lookup: Lookup, odom_frame: str, base_frame: str) -> None:
        self.lookup = lookup
        self.odom_frame = odom_frame
        self.base_frame = base_frame

    def pose_at(self, stamp_ns: int) -> Pose | None:
        """None when TF cannot tell (the frames then vote by order)."""
        try:
            return Pose(*finite_lookup(self.lookup, self.odom_frame, self.base_frame, stamp_ns))
        except TransformUnavailable:
            return None
