"""Message conversions, the camera-mount math, output checks, the /initialpose gate and the
odometry track (real sensor_msgs messages; no running node)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from ros_doubles import TfLookupDouble
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

from vlm_vpr.core.bags import _quat_mul
from vlm_vpr.core.images import read_image
from vlm_vpr.core.initial_pose import InitialPoseConfig, InitialPoseGate
from vlm_vpr.core.types import Pose, planar_motion
from vlm_vpr.ros.conversions import (
    FrameSkipped,
    _cv_bridge,
    base_pose_from_camera,
    camera_info_topic,
    check_output,
    image_from_msg,
    image_msg,
    markers_msg,
    rectify_with_camera_info,
)
from vlm_vpr.ros.odometry import OdometryTrack
from vlm_vpr.ros.params import CameraOffsetConfig
from vlm_vpr.ros.tf_adapter import (
    FixedOffset,
    TfOdometry,
    TfOffset,
    TransformUnavailable,
    base_in_camera_from_offset,
    mount_from_transform,
)


@pytest.fixture(scope='module')
def image(data_root: Path) -> np.ndarray:
    return read_image(data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png')


def raw(image: np.ndarray, encoding: str = 'bgr8', pad: int = 0) -> Image:
    rows = image.reshape(image.shape[0], -1)
    rows = np.hstack([rows, np.zeros((rows.shape[0], pad), np.uint8)])
    return Image(
        height=image.shape[0],
        width=image.shape[1],
        encoding=encoding,
        step=rows.shape[1],
        data=rows.tobytes(),
    )


def compressed(image: np.ndarray, ext: str = '.jpg') -> CompressedImage:
    return CompressedImage(format=ext[1:], data=cv2.imencode(ext, image)[1].tobytes())


def test_image_messages_of_common_encodings_become_the_same_bgr_image(image: np.ndarray) -> None:
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(image_from_msg(raw(image)), image)
    assert np.array_equal(image_from_msg(raw(image[:, :, ::-1].copy(), 'rgb8')), image)
    assert np.array_equal(image_from_msg(raw(image, pad=6)), image)  # row padding (step)
    assert np.array_equal(image_from_msg(raw(grey, 'mono8'))[:, :, 0], grey)
    assert np.array_equal(image_from_msg(compressed(image, '.png')), image)
    jpeg = image_from_msg(compressed(image))
    assert jpeg.shape == image.shape and np.abs(jpeg.astype(int) - image).mean() < 3


@pytest.mark.parametrize(
    ('make', 'reason', 'message'),
    [
        (
            lambda im: Image(height=4, width=4, encoding='xyz123', step=12, data=bytes(48)),
            'bad_encoding',
            "Format 'xyz123' is not supported",
        ),
        (lambda im: Image(height=0, width=0, encoding='bgr8', step=0), 'empty', '0x0'),
        (lambda im: CompressedImage(format='jpeg'), 'empty', 'without data'),
        (
            lambda im: Image(height=240, width=426, encoding='bgr8', step=1278, data=bytes(100)),
            'corrupt',
            'truncated or inconsistent',
        ),
        (
            lambda im: Image(height=8, width=8, encoding='bgr8', step=23, data=bytes(8 * 24)),
            'corrupt',
            'step 23 is shorter than a row of 8 bgr8 pixels',
        ),
        (
            lambda im: CompressedImage(format='jpeg', data=compressed(im).data[:4000]),
            'corrupt',
            'cannot convert CompressedImage',
        ),
        (
            lambda im: Image(height=10000, width=10000, encoding='mono8', step=10000),
            'too_large',
            'exceeds 40000000 pixels',
        ),
        (
            lambda im: compressed(np.zeros((10000, 10000), np.uint8), '.png'),
            'too_large',
            'decodes to 10000x10000',
        ),
        (
            lambda im: Image(height=10, width=100, encoding='mono8', step=100, data=bytes(1000)),
            'bad_shape',
            'image of 100x10 is 10:1, beyond the 8:1 aspect ratio limit',
        ),
    ],
)
def test_unusable_frames_raise_frame_skipped_with_a_reason(
    image: np.ndarray, make, reason: str, message: str
) -> None:
    with pytest.raises(FrameSkipped, match=message) as caught:
        image_from_msg(make(image))
    assert caught.value.reason == reason


def test_image_msg_round_trips_through_image_from_msg(image: np.ndarray) -> None:
    msg = image_msg(image, Header(frame_id='camera'))
    assert (msg.encoding, msg.header.frame_id) == ('bgr8', 'camera')
    assert np.array_equal(image_from_msg(msg), image)


# Stand-in for ROS 2's cv_bridge (no PyPI wheel; tests run without a ROS install): its layout,
# a Python package whose __init__ swallows the ImportError of the compiled ``boost`` module, and
# a CvBridge that imports that module when it converts. The stand-in's conversion inverts the
# image, so a test can tell which library converted.
CV_BRIDGE_STAND_IN = {
    '__init__.py': (
        'from .core import CvBridge, CvBridgeError\n'
        'try:\n'
        '    from cv_bridge.boost.cv_bridge_boost import getCvType\n'
        'except ImportError:\n'
        '    pass\n'
    ),
    'core.py': (
        'import numpy as np\n'
        'class CvBridgeError(TypeError):\n'
        '    pass\n'
        'class CvBridge:\n'
        '    def imgmsg_to_cv2(self, msg, desired_encoding="passthrough"):\n'
        '        from cv_bridge.boost.cv_bridge_boost import cvtColor2\n'
        '        image = np.frombuffer(bytes(msg.data), np.uint8)\n'
        '        return cvtColor2(image.reshape(msg.height, msg.width, 3), desired_encoding)\n'
    ),
    'boost/__init__.py': '',
}
BOOST_LOADS = (
    'def cvtColor2(image, encoding):\n    return 255 - image\ndef getCvType(e):\n    return 0\n'
)
BOOST_BUILT_FOR_NUMPY_1 = "raise ImportError('numpy.core.multiarray failed to import')\n"


@pytest.mark.parametrize(
    'boost', [BOOST_LOADS, BOOST_BUILT_FOR_NUMPY_1], ids=['loads', 'built_for_numpy_1']
)
def test_cv_bridge_converts_where_it_loads_and_rosbags_image_where_its_compiled_part_fails(
    image: np.ndarray, boost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in {**CV_BRIDGE_STAND_IN, 'boost/cv_bridge_boost.py': boost}.items():
        (tmp_path / 'cv_bridge' / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'cv_bridge' / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split('.')[0] == 'cv_bridge']:
        monkeypatch.delitem(sys.modules, name)
    _cv_bridge.cache_clear()  # decided once per process: decide again with the stand-in
    try:
        converted = image_from_msg(raw(image))
        assert np.array_equal(image_from_msg(raw(image)), converted)  # the decision is kept
    finally:
        _cv_bridge.cache_clear()
        for name in [m for m in sys.modules if m.split('.')[0] == 'cv_bridge']:
            del sys.modules[name]
    expected = 255 - image if boost == BOOST_LOADS else image
    assert np.array_equal(converted, expected)


@pytest.mark.parametrize(
    ('image_topic', 'info_topic'),
    [
        ('image', 'camera_info'),
        ('/image', '/camera_info'),
        ('camera/image_raw', 'camera/camera_info'),
        ('/robot/front/image_rect_color/', '/robot/front/camera_info'),
        ('/robot/front/image_raw/compressed', '/robot/front/camera_info'),
        ('camera2/image/compressed', 'camera2/camera_info'),
    ],
)
def test_camera_info_topic_is_the_sibling_of_the_image_topic(
    image_topic: str, info_topic: str
) -> None:
    assert camera_info_topic(image_topic) == info_topic


def calibration(
    width: int = 426, height: int = 240, d: tuple[float, ...] = (-0.3, 0.08, 0, 0, 0), **fields
) -> CameraInfo:
    k = [250.0, 0.0, 213.0, 0.0, 250.0, 120.0, 0.0, 0.0, 1.0]
    return CameraInfo(
        width=width,
        height=height,
        distortion_model='plumb_bob',
        d=list(d),
        k=k,
        p=k[:3] + [0.0] + k[3:6] + [0.0] + k[6:] + [0.0],
        **fields,
    )


def test_rectify_with_camera_info_remaps_only_a_distorted_whole_frame(image: np.ndarray) -> None:
    rectified, state = rectify_with_camera_info(image, calibration())
    assert state == 'rectified' and rectified.shape == image.shape
    assert np.abs(rectified.astype(int) - image).mean() > 5.0
    full_roi = RegionOfInterest(width=426, height=240)
    assert rectify_with_camera_info(image, calibration(roi=full_roi))[1] == 'rectified'
    assert rectify_with_camera_info(image, calibration(d=(0.0,) * 5)) == (image, 'not_distorted')
    for unsupported in (
        {'binning_x': 2},
        {'roi': RegionOfInterest(x_offset=10, width=100, height=100)},
    ):
        assert rectify_with_camera_info(image, calibration(**unsupported)) == (
            image,
            'roi_or_binning',
        )


@pytest.mark.parametrize(
    ('info', 'message'),
    [
        (
            calibration(width=640, height=480),
            'image of 426x240 does not match its calibration of 640x480',
        ),
        (
            calibration(d=(0.1, 0.2)),
            r'plumb_bob needs 5 finite distortion coefficients, got \[0.1, 0.2\]',
        ),
    ],
)
def test_rectify_with_camera_info_skips_a_frame_that_does_not_fit(
    image: np.ndarray, info: CameraInfo, message: str
) -> None:
    with pytest.raises(FrameSkipped, match=message) as caught:
        rectify_with_camera_info(image, info)
    assert caught.value.reason == 'bad_camera_info'
    assert 'use_camera_info: false' in str(caught.value)


def test_camera_offset_moves_the_pose_to_the_base_and_widens_the_covariance() -> None:
    # camera 1 m ahead of the base and turned left 90 deg; camera at (10, 5) facing +y
    base_in_camera = base_in_camera_from_offset(CameraOffsetConfig(x_m=1.0, yaw_deg=90.0))
    camera = Pose.from_yaw(10.0, 5.0, math.pi / 2)
    covariance = np.diag([0.25, 0.25, 1.0, 0.25, 0.25, 0.04])
    base, base_cov = base_pose_from_camera(camera, covariance, base_in_camera)
    # the base faces +x (camera yaw - 90 deg) and sits 1 m behind the camera along +x
    assert (base.x, base.y, base.yaw_rad) == pytest.approx((9.0, 5.0, 0.0), abs=1e-9)
    assert base_cov[1, 1] == pytest.approx(0.25 + 0.04)  # yaw error swings the 1 m lever in y
    assert base_cov[0, 0] == pytest.approx(0.25)
    check_output(base, base_cov)
    unknown, unknown_cov = base_pose_from_camera(
        Pose(10.0, 5.0, yaw_known=False), covariance, base_in_camera
    )
    assert (unknown.x, unknown.y, unknown.yaw_known) == (10.0, 5.0, False)
    assert unknown_cov[0, 0] == pytest.approx(1.25)


@pytest.mark.parametrize('yaw_deg', [0.0, 90.0, -135.0])
@pytest.mark.parametrize('pitch_deg', [0.0, 30.0, -20.0])
@pytest.mark.parametrize('roll_deg', [0.0, 25.0])
def test_a_pitched_or_rolled_camera_mount_from_tf_is_levelled_before_it_is_inverted(
    yaw_deg: float, pitch_deg: float, roll_deg: float
) -> None:
    # camera 0.3 m ahead of the base, 0.1 m left, 1 m up; turned by yaw, pitched, then rolled
    # (pitch and roll together are where the naive 2 atan2(qz, qw) heading goes wrong)
    yaw, pitch, roll = (math.radians(a) for a in (yaw_deg, pitch_deg, roll_deg))
    q_yaw = np.array([0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)])  # x, y, z, w
    q_pitch = np.array([0.0, math.sin(pitch / 2), 0.0, math.cos(pitch / 2)])
    q_roll = np.array([math.sin(roll / 2), 0.0, 0.0, math.cos(roll / 2)])
    q = _quat_mul(_quat_mul(q_yaw, q_pitch), q_roll)
    mount = mount_from_transform(0.3, 0.1, 1.0, *q)
    assert (mount.x_m, mount.y_m, mount.z_m) == pytest.approx((0.3, 0.1, 1.0))
    assert mount.yaw_deg == pytest.approx(yaw_deg)
    # the robot base lies where the levelled camera mount says, whatever the pitch
    camera = Pose.from_yaw(10.0, 5.0, 0.4)
    base, _ = base_pose_from_camera(camera, np.eye(6), base_in_camera_from_offset(mount))
    base_yaw = 0.4 - yaw
    expected_x = 10.0 - (math.cos(base_yaw) * 0.3 - math.sin(base_yaw) * 0.1)
    expected_y = 5.0 - (math.sin(base_yaw) * 0.3 + math.cos(base_yaw) * 0.1)
    assert (base.x, base.y) == pytest.approx((expected_x, expected_y), abs=1e-9)
    assert math.atan2(math.sin(base.yaw_rad - base_yaw), math.cos(base.yaw_rad - base_yaw)) == (
        pytest.approx(0.0, abs=1e-9)
    )


def test_fixed_offset_of_zero_leaves_the_pose_unchanged() -> None:
    pose = Pose.from_yaw(3.0, -2.0, 0.7)
    base, _ = base_pose_from_camera(
        pose, np.eye(6), FixedOffset(CameraOffsetConfig()).base_in_camera('camera')
    )
    assert (base.x, base.y, base.yaw_rad) == pytest.approx((3.0, -2.0, 0.7))


@pytest.mark.parametrize(
    'broken', ['nan_pose', 'zero_variance', 'nan_covariance', 'asymmetric', 'bad_quaternion']
)
def test_check_output_refuses_poses_amcl_would_reject(broken: str) -> None:
    pose, cov = Pose.from_yaw(1.0, 2.0, 0.3), np.eye(6)
    if broken == 'nan_pose':
        pose = Pose.from_yaw(math.nan, 2.0, 0.3)
    elif broken == 'zero_variance':
        cov[5, 5] = 0.0
    elif broken == 'nan_covariance':
        cov[0, 1] = cov[1, 0] = math.nan
    elif broken == 'asymmetric':
        cov[0, 1] = 0.5
    else:
        pose = Pose(1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(FrameSkipped, match='refusing to publish') as caught:
        check_output(pose, cov)
    assert caught.value.reason == 'invalid_output'


def test_markers_clear_the_previous_set_then_mark_each_candidate() -> None:
    poses = [Pose.from_yaw(float(i), 0.0, 0.0) for i in range(3)]
    markers = markers_msg(poses, [0.9, 0.8, 0.7], Header(frame_id='map')).markers
    assert markers[0].action == markers[0].DELETEALL
    assert len(markers) == 1 + 2 * len(poses)
    assert [m.text for m in markers[2::2]] == ['1: 0.900', '2: 0.800', '3: 0.700']
    assert all(m.header.frame_id == 'map' for m in markers)


GATE = InitialPoseConfig(enabled=True, consecutive_frames=3, max_distance_m=2.0, max_yaw_deg=20)


def test_gate_passes_after_n_agreeing_frames_then_stays_shut_until_rearmed() -> None:
    gate = InitialPoseGate()
    step = Pose.from_yaw(3.0, 0.0, 0.0)  # odometry: 3 m forward per frame
    poses = [Pose.from_yaw(3.0 * i + 0.5, 0.2, 0.05) for i in range(6)]
    passed = [gate.update(p, 0.95, step, GATE, 0.9) for p in poses]
    assert passed == [False, False, True, False, False, False]
    gate.rearm()
    assert [gate.update(p, 0.95, step, GATE, 0.9) for p in poses[:3]] == [False, False, True]


@pytest.mark.parametrize('interruption', ['low_confidence', 'jump', 'turn'])
def test_gate_restarts_the_count_on_a_disagreeing_or_unsure_frame(interruption: str) -> None:
    gate = InitialPoseGate()
    step = Pose.from_yaw(3.0, 0.0, 0.0)
    good = [Pose.from_yaw(3.0 * i, 0.0, 0.0) for i in range(8)]
    odd = {
        'low_confidence': good[2],
        'jump': Pose.from_yaw(40.0, 30.0, 0.0),
        'turn': Pose.from_yaw(6.0, 0.0, 1.0),
    }[interruption]
    confidence = 0.5 if interruption == 'low_confidence' else 0.95
    assert not gate.update(good[0], 0.95, step, GATE, 0.9)
    assert not gate.update(good[1], 0.95, step, GATE, 0.9)
    assert not gate.update(odd, confidence, step, GATE, 0.9)
    assert gate.run_length == (0 if interruption == 'low_confidence' else 1)
    # the count restarts: the next frames must agree among themselves (odometry from `odd`)
    rest = [gate.update(p, 0.95, None, GATE, 0.9) for p in [odd, odd, odd]]
    assert rest.count(True) == 1 and not rest[0]


def test_gate_without_odometry_compares_consecutive_poses_directly() -> None:
    gate = InitialPoseGate()
    still = [Pose.from_yaw(5.0 + 0.5 * i, 0.0, 0.0) for i in range(3)]
    assert [gate.update(p, 0.95, None, GATE, 0.9) for p in still] == [False, False, True]
    gate.rearm()
    # 5.0, 5.5, then 8.0: 2.5 m from the previous pose (over max_distance_m 2): the run restarts
    jump = [Pose.from_yaw(x, 0.0, 0.0) for x in (5.0, 5.5, 8.0)]
    assert [gate.update(p, 0.95, None, GATE, 0.9) for p in jump] == [False, False, False]
    assert gate.run_length == 1
    on = [Pose.from_yaw(x, 0.0, 0.0) for x in (9.5, 11.0)]  # agree with 8.0: passes at 11.0
    assert [gate.update(p, 0.95, None, GATE, 0.9) for p in on] == [False, True]


def test_odometry_track_gives_the_sample_nearest_a_stamp_within_half_a_second() -> None:
    track = OdometryTrack()
    first, second = Pose.from_yaw(10.0, 0.0, math.pi / 2), Pose.from_yaw(10.0, 3.0, math.pi)
    track.add(1_000_000_000, first)
    track.add(2_000_000_000, second)
    assert track.pose_at(1_400_000_000) == first and track.pose_at(1_600_000_000) == second
    assert track.pose_at(2_500_000_000) == second
    assert track.pose_at(2_600_000_000) is None  # no odometry within 0.5 s
    assert track.pose_at(0) is None


def test_odometry_with_nan_values_is_not_stored_and_never_lets_the_gate_agree() -> None:
    track = OdometryTrack()
    assert track.add(1_000_000_000, Pose.from_yaw(0.0, 0.0, 0.0))
    assert not track.add(2_000_000_000, Pose(math.nan, 0.0))  # a driver's NaN sample
    assert track.pose_at(2_000_000_000) is None  # unknown, not NaN
    # a NaN motion reaching the gate (34 m apart) must not count as agreement
    gate, nan_step = InitialPoseGate(), Pose(math.nan, math.nan)
    far = [
        Pose.from_yaw(0.0, 0.0, 0.0),
        Pose.from_yaw(34.0, 0.0, 0.0),
        Pose.from_yaw(0.0, 0.0, 0.0),
    ]
    assert [gate.update(p, 0.95, nan_step, GATE, 0.9) for p in far] == [False] * 3


def test_tf_odometry_is_the_transform_at_the_stamp_and_its_motion_is_in_the_robot_frame() -> None:
    """TfOdometry on a stand-in for tf2's lookup (tf2_ros cannot be installed here)."""
    half = math.sqrt(0.5)
    lookup = TfLookupDouble()
    lookup.transforms[('odom', 'base_link')] = {  # x, y, z, qx, qy, qz, qw (yaw pi/2, then pi)
        1_000_000_000: (10.0, 0.0, 0.0, 0.0, 0.0, half, half),
        2_000_000_000: (10.0, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    }
    tf = TfOdometry(lookup, 'odom', 'base_link')
    motion = planar_motion(tf.pose_at(1_000_000_000), tf.pose_at(2_000_000_000))
    assert (motion.x, motion.y, motion.yaw_rad) == pytest.approx((3.0, 0.0, math.pi / 2))
    assert lookup.calls == [
        ('odom', 'base_link', 1_000_000_000),
        ('odom', 'base_link', 2_000_000_000),
    ]
    assert tf.pose_at(9_000_000_000) is None  # TF cannot tell: frame order


def test_a_non_finite_transform_is_unavailable_not_a_pose() -> None:
    broken = (0.1, math.nan, 0.0, 0.0, 0.0, 0.0, 1.0)  # a publisher gone wrong
    lookup = TfLookupDouble()
    lookup.transforms[('base_link', 'camera')] = {None: broken}
    lookup.transforms[('odom', 'base_link')] = {None: broken}
    with pytest.raises(TransformUnavailable, match="'camera' is not finite.*camera mount"):
        TfOffset(lookup, 'base_link').base_in_camera('camera')
    assert TfOdometry(lookup, 'odom', 'base_link').pose_at(1) is None  # frame order
