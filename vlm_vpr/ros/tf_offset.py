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
    """The latest TF ``camera_frame -> base_frame`` (the camera is taken as rigidly mounted).

    ``camera_frame`` should be x-forward (camera_link), not an optical frame: only the planar
    part (x, y, z, yaw) of the transform is used.
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
            t = self.buffer.lookup_transform(camera_frame, self.base_frame, Time()).transform
        except self._errors as exc:
            raise TransformUnavailable(
                f'no TF from {camera_frame!r} to {self.base_frame!r} ({exc}); publish the camera '
                'mount (robot_state_publisher) or set use_tf: false and camera_offset.*'
            ) from exc
        q = t.rotation
        return Pose(t.translation.x, t.translation.y, t.translation.z, q.x, q.y, q.z, q.w)


def tf_available() -> bool:
    """True where tf2_ros can be imported (a ROS install)."""
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True
