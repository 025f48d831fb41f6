"""Where the camera sits on the robot: from TF (tf2_ros, on a ROS install) or a fixed parameter.

tf2_ros is not published as a PyPI wheel, so machines without a ROS install use the fixed
``camera_offset.*`` parameters; this module is the only place that touches tf2. Both sources
answer one question: the pose of ``base_frame`` in the camera frame (planar part: x, y, z and
yaw), used to turn the localised camera pose into the robot's pose.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from vlm_vpr.core.errors import VprError
from vlm_vpr.core.types import Pose
from vlm_vpr.ros.params import CameraOffsetConfig


class TransformUnavailable(VprError):
    """TF has no transform between the camera and the base frame (yet)."""


class OffsetSource(Protocol):
    def base_in_camera(self, camera_frame: str) -> Pose:
        """The pose of the base frame in ``camera_frame``; TransformUnavailable if unknown."""

    def close(self) -> None:
        """Stop listening (the node's cleanup)."""


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

    def close(self) -> None:
        pass


class TfOffset:
    """The latest TF ``base_frame -> camera_frame`` (the camera is taken as rigidly mounted).

    ``camera_frame`` should be x-forward (camera_link), not an optical frame; it may be pitched
    or rolled: the camera's pose in the base frame is levelled (x, y, z and the heading of its
    x axis, see :func:`mount_from_transform`) before it is inverted.
    """

    def __init__(self, node: Any, base_frame: str) -> None:
        import tf2_ros

        self.base_frame = base_frame
        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)
        self._errors = (
            tf2_ros.LookupException,
            tf2_ros.ConnectivityException,
            tf2_ros.ExtrapolationException,
            tf2_ros.InvalidArgumentException,
        )

    def base_in_camera(self, camera_frame: str) -> Pose:
        from rclpy.time import Time

        try:
            t = self.buffer.lookup_transform(self.base_frame, camera_frame, Time()).transform
        except self._errors as exc:
            raise TransformUnavailable(
                f'no TF from {self.base_frame!r} to {camera_frame!r} ({exc}); publish the camera '
                'mount (robot_state_publisher) or set use_tf: false and camera_offset.*'
            ) from exc
        p, q = t.translation, t.rotation
        return base_in_camera_from_offset(mount_from_transform(p.x, p.y, p.z, q.x, q.y, q.z, q.w))

    def close(self) -> None:
        self.listener.unregister()


def mount_from_transform(
    x: float, y: float, z: float, qx: float, qy: float, qz: float, qw: float
) -> CameraOffsetConfig:
    """The planar camera mount from the camera's pose in the base frame: its position and the
    heading of its x axis (the yaw of a yaw-pitch-roll rotation, whatever the pitch and roll)."""
    yaw = Pose(x, y, z, qx, qy, qz, qw).yaw_rad
    return CameraOffsetConfig(x_m=x, y_m=y, z_m=z, yaw_deg=math.degrees(yaw))


def tf_available() -> bool:
    """True where tf2_ros can be imported (a ROS install)."""
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True
