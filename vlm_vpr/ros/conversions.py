"""Message <-> array conversions of the node, and the checks on what it publishes.

Images are converted by a maintained library: cv_bridge where installed (a ROS install),
otherwise rosbags-image, which reads rclpy messages directly (it only needs their fields).
Every unusable frame raises :class:`FrameSkipped` with a short ``reason`` that /diagnostics
counts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from geometry_msgs.msg import Pose as PoseMsg
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from sensor_msgs.msg import Image
from visualization_msgs.msg import Marker, MarkerArray

from vlm_vpr.core.bags import image_message_to_cvimage
from vlm_vpr.core.errors import ImageError
from vlm_vpr.core.images import MAX_IMAGE_PIXELS, as_bgr, check_aspect_ratio, rectify_image
from vlm_vpr.core.types import Pose

MARKER_NS = 'vpr_candidates'


class FrameSkipped(ImageError):
    """A frame the node cannot use; ``reason`` is the /diagnostics counter it increments."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Images in


def image_from_msg(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """[H x W x 3] uint8 BGR from a sensor_msgs Image or CompressedImage; FrameSkipped if the
    frame is empty, too large, truncated, corrupt, of an encoding that cannot become BGR or
    more than 8:1 (``bad_shape``)."""
    compressed = hasattr(msg, 'format')
    if compressed and len(msg.data) == 0:
        raise FrameSkipped('empty', 'CompressedImage without data')
    if not compressed:
        _check_raw_size(msg, max_pixels)
    image = _convert(msg, compressed)
    if image.shape[0] * image.shape[1] > max_pixels:
        raise FrameSkipped(
            'too_large',
            f'{_describe(msg)} decodes to {image.shape[1]}x'
            f'{image.shape[0]}, over {max_pixels} pixels; send a smaller image',
        )
    try:
        check_aspect_ratio(image.shape[1], image.shape[0])
    except ImageError as exc:
        raise FrameSkipped('bad_shape', f'{_describe(msg)}: {exc}') from exc
    try:
        return as_bgr(image, max_pixels)
    except ImageError as exc:
        raise FrameSkipped('bad_encoding', f'{_describe(msg)}: {exc}') from exc


def _check_raw_size(msg: Any, max_pixels: int) -> None:
    if msg.height == 0 or msg.width == 0:
        raise FrameSkipped('empty', f'Image of {msg.width}x{msg.height} pixels')
    if msg.height * msg.width > max_pixels:
        raise FrameSkipped(
            'too_large',
            f'Image of {msg.width}x{msg.height} exceeds {max_pixels} pixels; send a smaller image',
        )
    if msg.step < msg.width or len(msg.data) < msg.step * msg.height:
        raise FrameSkipped(
            'corrupt',
            f'Image of {msg.width}x{msg.height}, step {msg.step}, '
            f'has {len(msg.data)} data bytes (truncated or inconsistent)',
        )


def _convert(msg: Any, compressed: bool) -> np.ndarray:
    """Convert with cv_bridge or rosbags-image; their errors (and OpenCV's, and the
    AssertionError / TypeError rosbags-image raises on undecodable or short data) -> skip."""
    import cv2

    bridge = _cv_bridge()
    if bridge is None:
        from rosbags.image import ImageError as RosImageError

        convert, library_error = _convert_rosbags, RosImageError
    else:
        from cv_bridge import CvBridgeError

        convert = bridge.compressed_imgmsg_to_cv2 if compressed else bridge.imgmsg_to_cv2
        library_error = CvBridgeError
    try:
        image = convert(msg, 'bgr8')
    except (library_error, cv2.error, AssertionError, TypeError, ValueError) as exc:
        reason = 'corrupt' if compressed else 'bad_encoding'
        detail = str(exc) or type(exc).__name__
        raise FrameSkipped(reason, f'cannot convert {_describe(msg)} to BGR ({detail})') from exc
    if image is None:
        raise FrameSkipped('corrupt', f'{_describe(msg)} is not a decodable image')
    return image


@functools.cache
def _cv_bridge() -> Any:
    """A CvBridge where cv_bridge and its compiled part load, else None (rosbags-image), decided
    once: cv_bridge's __init__ swallows its compiled part's ImportError (a cv_bridge built for
    numpy 1 under numpy 2), and CvBridge would import that part again at every conversion."""
    try:
        from cv_bridge import CvBridge
        from cv_bridge.boost.cv_bridge_boost import cvtColor2  # noqa: F401
    except ImportError:
        return None
    return CvBridge()


def _convert_rosbags(msg: Any, encoding: str) -> np.ndarray:
    try:
        return image_message_to_cvimage(msg, encoding)
    except ImageError as exc:  # an Image whose step is shorter than a row
        raise FrameSkipped('corrupt', f'{_describe(msg)}: {exc}') from exc


def _describe(msg: Any) -> str:
    if hasattr(msg, 'format'):
        return f'CompressedImage ({msg.format or "no format"}, {len(msg.data)} bytes)'
    return f'Image ({msg.encoding or "no encoding"}, {msg.width}x{msg.height})'


# ---------------------------------------------------------------------------------------------
# Camera calibration


def camera_info_topic(image_topic: str) -> str:
    """The CameraInfo topic of an image topic, named as image_transport does: the sibling
    ``camera_info`` of the image topic, with a ``/compressed`` transport suffix stripped first
    (``/cam/image_raw/compressed`` -> ``/cam/camera_info``, ``image`` -> ``camera_info``)."""
    topic = image_topic.rstrip('/')
    topic = topic.removesuffix('/compressed')
    head, slash, _ = topic.rpartition('/')
    return f'{head}{slash}camera_info'


def rectify_with_camera_info(image: np.ndarray, info: Any) -> tuple[np.ndarray, str]:
    """``image`` [H x W x 3] uint8 BGR rectified with its sensor_msgs/CameraInfo, and what was
    done: 'rectified', 'not_distorted' (D all zero: the frame is used as it is) or
    'roi_or_binning' (a calibration for a region or binned frames: used unrectified).
    FrameSkipped('bad_camera_info') when the frame does not fit the calibration."""
    roi = info.roi
    whole_frame = (roi.x_offset, roi.y_offset) == (0, 0) and (roi.width, roi.height) in (
        (0, 0),
        (info.width, info.height),
    )
    if max(info.binning_x, info.binning_y) > 1 or not whole_frame:
        return image, 'roi_or_binning'
    try:
        rectified = rectify_image(
            image,
            np.array(info.k),
            np.array(info.d),
            np.array(info.p),
            info.distortion_model,
            info.width,
            info.height,
        )
    except ImageError as exc:
        raise FrameSkipped(
            'bad_camera_info', f'{exc} (or set use_camera_info: false to localise unrectified)'
        ) from exc
    return rectified, 'rectified' if rectified is not image else 'not_distorted'


# ---------------------------------------------------------------------------------------------
# Camera mount


def base_pose_from_camera(
    pose: Pose,
    covariance: np.ndarray,
    base_in_camera: Pose,
) -> tuple[Pose, np.ndarray]:
    """The base pose in the map from the camera's pose (planar): T_map_base = T_map_cam *
    T_cam_base, with the covariance [6 x 6] propagated through the lever arm. With an unknown
    camera yaw the lever arm's direction is unknown: its length is added to the x, y spread."""
    bx, by, byaw = base_in_camera.x, base_in_camera.y, base_in_camera.yaw_rad
    z = pose.z + base_in_camera.z
    if not pose.yaw_known:
        lever = np.zeros((6, 6))
        lever[0, 0] = lever[1, 1] = bx * bx + by * by
        return Pose(pose.x, pose.y, z, yaw_known=False), covariance + lever
    yaw = pose.yaw_rad
    c, s = math.cos(yaw), math.sin(yaw)
    jacobian = np.eye(6)
    jacobian[0, 5] = -s * bx - c * by
    jacobian[1, 5] = c * bx - s * by
    base = Pose.from_yaw(pose.x + c * bx - s * by, pose.y + s * bx + c * by, yaw + byaw, z)
    return base, jacobian @ covariance @ jacobian.T


def check_output(pose: Pose, covariance: np.ndarray) -> None:
    """FrameSkipped('invalid_output') unless the pose is finite and the covariance [6 x 6] is
    finite, symmetric and positive on the diagonal (what AMCL and robot_localization need)."""
    norm = math.sqrt(pose.qx**2 + pose.qy**2 + pose.qz**2 + pose.qw**2)
    cov = np.asarray(covariance, dtype=np.float64)
    ok = (
        pose.is_finite
        and abs(norm - 1.0) < 1e-3
        and cov.shape == (6, 6)
        and bool(np.isfinite(cov).all())
        and bool((np.diag(cov) > 0).all())
        and bool(np.allclose(cov, cov.T, atol=1e-9))
    )
    if not ok:
        diagonal = np.diag(cov).tolist() if cov.ndim == 2 else cov
        raise FrameSkipped(
            'invalid_output',
            f'refusing to publish pose {pose} with covariance diagonal {diagonal}',
        )


# ---------------------------------------------------------------------------------------------
# Messages out


def pose_msg(pose: Pose) -> PoseMsg:
    msg = PoseMsg()
    msg.position.x, msg.position.y, msg.position.z = pose.x, pose.y, pose.z
    o = msg.orientation
    o.x, o.y, o.z, o.w = pose.qx, pose.qy, pose.qz, pose.qw
    return msg


def pose_with_covariance_msg(
    pose: Pose, covariance: np.ndarray, header: Any
) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped(header=header)
    msg.pose.pose = pose_msg(pose)
    msg.pose.covariance = [float(v) for v in np.asarray(covariance, np.float64).reshape(36)]
    return msg


def pose_array_msg(poses: list[Pose], header: Any) -> PoseArray:
    return PoseArray(header=header, poses=[pose_msg(p) for p in poses])


def markers_msg(poses: list[Pose], scores: list[float], header: Any) -> MarkerArray:
    """RViz markers: an arrow per candidate (the best green, the rest orange, fading with
    rank) and its rank and score as text; the first marker clears the previous set."""
    markers = [Marker(header=header, ns=MARKER_NS, action=Marker.DELETEALL)]
    for rank, (pose, score) in enumerate(zip(poses, scores)):
        fade = 1.0 / (1.0 + rank)
        arrow = Marker(
            header=header,
            ns=MARKER_NS,
            id=2 * rank,
            type=Marker.ARROW,
            action=Marker.ADD,
            pose=pose_msg(pose),
        )
        arrow.scale.x, arrow.scale.y, arrow.scale.z = 2.0, 0.4, 0.4
        arrow.color.r, arrow.color.g, arrow.color.b = (
            (0.1, 0.9, 0.1) if rank == 0 else (1.0, 0.6, 0.0)
        )
        arrow.color.a = 0.3 + 0.7 * fade
        text = Marker(
            header=header,
            ns=MARKER_NS,
            id=2 * rank + 1,
            type=Marker.TEXT_VIEW_FACING,
            action=Marker.ADD,
            pose=pose_msg(pose),
            text=f'{rank + 1}: {score:.3f}',
        )
        text.pose.position.z += 1.0
        text.scale.z = 0.8
        text.color.r = text.color.g = text.color.b = text.color.a = 1.0
        markers += [arrow, text]
    return MarkerArray(markers=markers)


def debug_image(
    query_bgr: np.ndarray, match_bgr: np.ndarray | None, caption: str, height_px: int = 240
) -> np.ndarray:
    """[height_px x W x 3] uint8 BGR: the query beside its best match, captioned."""
    import cv2

    def fit(image: np.ndarray) -> np.ndarray:
        width = max(1, round(image.shape[1] * height_px / image.shape[0]))
        return cv2.resize(image, (width, height_px), interpolation=cv2.INTER_AREA)

    tiles = [fit(query_bgr)] + ([fit(match_bgr)] if match_bgr is not None else [])
    canvas = np.ascontiguousarray(np.hstack(tiles))
    cv2.putText(canvas, caption, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 0), 2)
    return canvas


def image_msg(image_bgr: np.ndarray, header: Any) -> Image:
    """A 'bgr8' sensor_msgs/Image of [H x W x 3] uint8 BGR ``image_bgr`` (cv_bridge if any)."""
    bridge = _cv_bridge()
    if bridge is None:
        image = np.ascontiguousarray(image_bgr)
        return Image(
            header=header,
            height=image.shape[0],
            width=image.shape[1],
            encoding='bgr8',
            is_bigendian=0,
            step=image.strides[0],
            data=image.tobytes(),
        )
    msg = bridge.cv2_to_imgmsg(image_bgr, 'bgr8')
    msg.header = header
    return msg


def stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
