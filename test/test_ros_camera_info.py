"""Optional camera_info input (use_camera_info): a distorted campus_loop frame with its
CameraInfo is rectified before localisation; a frame whose size disagrees with its CameraInfo
is a diagnosed skip; a camera without CameraInfo is localised unrectified and reported
(real rclpy, in-process node)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.images import read_image, rectify_image
from vlm_vpr.ros.conversions import stamp_ns
from vlm_vpr.ros.harness import NodeHarness, camera_msg, header_at, wait_until

T0_NS = 1_700_000_000_000_000_000
IMAGE_TOPIC = 'camera/image_raw'  # its CameraInfo: camera/camera_info
UNCALIBRATED_TOPIC = 'camera2/image/compressed'  # camera2/camera_info: never published
QUERY = 12  # the campus_loop query frame used
K = np.array([[250.0, 0.0, 213.0], [0.0, 250.0, 120.0], [0.0, 0.0, 1.0]])
D = np.array([-0.3, 0.08, 0.0, 0.0, 0.0])  # plumb_bob: strong barrel distortion


@pytest.fixture(scope='module')
def queries(data_root: Path) -> Traversal:
    return read_traversal(data_root / 'campus_loop' / 'query')


@pytest.fixture(scope='module')
def distorted(queries: Traversal) -> np.ndarray:
    """Query frame QUERY as a lens with K, D would see it: each pixel samples the pinhole
    frame where OpenCV's point undistortion puts it."""
    image = read_image(queries.image_paths[QUERY])
    h, w = image.shape[:2]
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pixels = np.stack([u.ravel(), v.ravel()], axis=1).reshape(-1, 1, 2)
    maps = cv2.undistortPoints(pixels, K, D, P=K).reshape(h, w, 2).astype(np.float32)
    return cv2.remap(image, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR)


def camera_info(width: int, height: int, stamp: int) -> CameraInfo:
    p = np.hstack([K, np.zeros((3, 1))])
    return CameraInfo(
        header=header_at(stamp, 'camera'),
        width=width,
        height=height,
        distortion_model='plumb_bob',
        d=D.tolist(),
        k=K.ravel().tolist(),
        r=np.eye(3).ravel().tolist(),
        p=p.ravel().tolist(),
    )


@pytest.fixture(scope='module')
def harness(campus_map: Path) -> NodeHarness:
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'use_camera_info': True,
        'image_topics': [IMAGE_TOPIC, UNCALIBRATED_TOPIC],
        'max_rate_hz': 50.0,
        'debug_image': True,
    }
    with NodeHarness(parameters, namespace='camera_info_test') as running:
        running.pubs = {
            'image': running.publisher(Image, IMAGE_TOPIC),
            'info': running.publisher(CameraInfo, 'camera/camera_info'),
            'compressed': running.publisher(CompressedImage, UNCALIBRATED_TOPIC),
        }
        yield running


def send_camera_info(harness: NodeHarness, width: int, height: int, stamp: int) -> None:
    received = harness.node.counts().get('camera_info_received', 0)
    harness.pubs['info'].publish(camera_info(width, height, stamp))
    assert wait_until(
        lambda: harness.node.counts().get('camera_info_received', 0) > received, 10.0
    )


def localise(harness: NodeHarness, topic: str, msg: Any) -> Any:
    harness.pubs[topic].publish(msg)
    stamp = stamp_ns(msg.header)
    return harness.wait_for_pose(stamp)


def diagnostic_values(harness: NodeHarness, key: str, value: str) -> dict[str, str] | None:
    """The values of the first /diagnostics message (published now) where key == value."""
    harness.node.publish_diagnostics()
    msg = harness.wait_for(
        '/diagnostics',
        lambda m: any(kv.key == key and kv.value == value for kv in m.status[0].values),
        5.0,
    )
    return None if msg is None else {kv.key: kv.value for kv in msg.status[0].values}


def test_a_distorted_frame_is_rectified_with_its_camera_info_before_localisation(
    harness: NodeHarness, distorted: np.ndarray, queries: Traversal
) -> None:
    stamp = T0_NS
    send_camera_info(harness, distorted.shape[1], distorted.shape[0], stamp)
    before = harness.node.counts().get('camera_info_rectified', 0)
    pose = localise(harness, 'image', camera_msg(distorted, stamp))
    assert pose is not None
    assert harness.node.counts()['camera_info_rectified'] == before + 1
    p = pose.pose.pose.position
    assert math.hypot(p.x - queries.xy[QUERY, 0], p.y - queries.xy[QUERY, 1]) <= 5.0
    # the debug image's query tile (240 px high like the frame) is the frame that was localised
    debug = harness.wait_for('debug_image', lambda m: stamp_ns(m.header) == stamp, 5.0)
    assert debug is not None
    tile = (
        np.frombuffer(debug.data, np.uint8)
        .reshape(debug.height, debug.width, 3)[40:, : distorted.shape[1]]
        .astype(int)
    )  # below the caption
    rectified = rectify_image(
        distorted,
        K,
        D,
        camera_info(0, 0, 0).p,
        'plumb_bob',
        distorted.shape[1],
        distorted.shape[0],
    )
    assert np.abs(tile - rectified[40:]).mean() < 1.0
    assert np.abs(tile - distorted[40:]).mean() > 5.0
    values = diagnostic_values(harness, 'camera_info_rectified', str(before + 1))
    assert values is not None and float(values['latency_rectify_ms']) > 0


def test_a_frame_whose_size_disagrees_with_its_camera_info_is_a_diagnosed_skip(
    harness: NodeHarness, distorted: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    stamp = T0_NS + 100 * 1_000_000_000
    send_camera_info(harness, distorted.shape[1], distorted.shape[0], stamp)
    before = harness.node.counts().get('skipped_bad_camera_info', 0)
    half = cv2.resize(distorted, (distorted.shape[1] // 2, distorted.shape[0] // 2))
    harness.pubs['image'].publish(camera_msg(half, stamp))
    assert wait_until(
        lambda: harness.node.counts().get('skipped_bad_camera_info', 0) == before + 1, 30.0
    )
    assert (
        'frame skipped (bad_camera_info): image of 213x120 does not match its '
        'calibration of 426x240' in capfd.readouterr().err
    )
    assert diagnostic_values(harness, 'skipped_bad_camera_info', str(before + 1)) is not None
    (status,) = harness.messages('/diagnostics')[-1].status  # the skip and the missing info
    assert status.level == b'\x01'
    assert status.message.startswith(f'{IMAGE_TOPIC}: last frame skipped (bad_camera_info); ')
    assert status.message.endswith("; no camera_info on ['camera2/camera_info']")
    # the node goes on: the next frame of the calibrated size is localised
    assert localise(harness, 'image', camera_msg(distorted, stamp + 1_000_000_000)) is not None
    assert not any(stamp_ns(m.header) == stamp for m in harness.messages('pose'))


def test_a_camera_without_camera_info_is_localised_unrectified_and_reported(
    harness: NodeHarness, distorted: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    before = harness.node.counts().get('camera_info_missing', 0)
    msg = camera_msg(distorted, T0_NS + 200 * 1_000_000_000, compressed=True)
    assert localise(harness, 'compressed', msg) is not None
    assert harness.node.counts()['camera_info_missing'] == before + 1
    assert 'no CameraInfo on camera2/camera_info yet' in capfd.readouterr().err
    values = diagnostic_values(harness, 'camera_info_missing', str(before + 1))
    assert values is not None and values['camera_info_missing_on'] == 'camera2/camera_info'
    level, message = harness.node.status
    assert level == b'\x00', message  # not blocked: the last frame localised (OK) ...
    (status,) = harness.messages('/diagnostics')[-1].status
    assert status.level == b'\x01' and 'no camera_info on' in status.message  # ... but warned
