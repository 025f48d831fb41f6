"""Bag reading and writing with rosbags: both storages, every image and pose message type."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from vlm_vpr.core import bags
from vlm_vpr.core.bags import BagWriter, read_pose_track, read_posed_images, write_traversal_bag
from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.errors import BagError
from vlm_vpr.core.images import read_image
from vlm_vpr.core.types import Pose

T0_NS = 1_700_000_000_000_000_000
IMAGE_TOPIC = '/camera/image_raw'
STORAGES = [('mcap', '.mcap'), ('sqlite3', '.db3')]
POSE_SOURCES = [
    bags.POSE_STAMPED,
    bags.POSE_WITH_COVARIANCE_STAMPED,
    bags.ODOMETRY,
    'tf',
    'tf_chain',
]
CAMERA_PITCH_RAD = 0.2


def ns(t_s: float) -> int:
    return T0_NS + round(t_s * 1e9)


@pytest.fixture(scope='module')
def query(data_root: Path) -> Traversal:
    """The first 4 images of campus_loop/query with their true poses."""
    full = read_traversal(data_root / 'campus_loop' / 'query')
    return replace(
        full, image_paths=full.image_paths[:4], xy=full.xy[:4], yaw_rad=full.yaw_rad[:4]
    )


@pytest.fixture(scope='module')
def images(query: Traversal) -> list[np.ndarray]:
    return [read_image(p) for p in query.image_paths]


def write_pose_bag(
    path: Path,
    images: list[np.ndarray],
    image_times_s: list[float],
    poses: list[tuple[float, float, float, float, float]],
    source: str,
    storage: str = 'mcap',
) -> None:
    """Images on IMAGE_TOPIC and poses ``(t_s, x, y, z, yaw)`` of base_link in map, written as
    ``source``; 'tf_chain' writes them as odom->base_link under a moving map->odom (10, -5)
    -> (14, -5) at yaw pi/2 (t = 0 s and 4 s) and a static base_link->camera 0.5 m ahead,
    pitched down by CAMERA_PITCH_RAD."""
    events = [(t, 'image', i) for i, t in enumerate(image_times_s)]
    events += [(p[0], 'pose', p) for p in poses]
    if source == 'tf_chain':
        events += [(0.0, 'map_odom', (10.0, -5.0)), (4.0, 'map_odom', (14.0, -5.0))]
    with BagWriter(path, storage=storage) as writer:
        if source == 'tf_chain':
            half = CAMERA_PITCH_RAD / 2
            camera = Pose(0.5, 0.0, 0.0, 0.0, math.sin(half), 0.0, math.cos(half))
            writer.write_transforms(ns(0), [('base_link', 'camera', camera)], static=True)
        for t, kind, item in sorted(events, key=lambda e: e[0]):
            if kind == 'image':
                writer.write_image(IMAGE_TOPIC, ns(t), images[item])
            elif kind == 'map_odom':
                map_odom = Pose.from_yaw(*item, math.pi / 2)
                writer.write_transforms(ns(t), [('map', 'odom', map_odom)])
            else:
                pose = Pose.from_yaw(item[1], item[2], item[4], item[3])
                if source == 'tf':
                    writer.write_transforms(ns(t), [('map', 'base_link', pose)])
                elif source == 'tf_chain':
                    writer.write_transforms(ns(t), [('odom', 'base_link', pose)])
                else:
                    writer.write_pose('/pose', ns(t), pose, msgtype=source)


def truncate(bag_folder: Path, suffix: str, fraction: float) -> Path:
    """A copy of the bag's storage file cut to ``fraction`` of its bytes."""
    [storage_file] = bag_folder.glob(f'*{suffix}')
    data = storage_file.read_bytes()
    out = bag_folder.parent / f'truncated{suffix}'
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def test_a_traversal_row_without_a_true_position_is_left_out_of_the_bag(tmp_path, query):
    xy = query.xy.copy()
    xy[1] = np.nan  # 0.5 s between its neighbours: a truth would be interpolated for it
    bag = write_traversal_bag(replace(query, xy=xy), tmp_path / 'bag')
    frames = read_posed_images(
        bag, IMAGE_TOPIC, '/ground_truth/pose', min_distance_m=0.0, min_rotation_rad=0.0
    )
    assert [f.stamp_ns for f in frames] == [T0_NS + i * 500_000_000 for i in (0, 2, 3)]


@pytest.mark.parametrize('compressed', [False, True])
@pytest.mark.parametrize(('storage', 'suffix'), STORAGES)
def test_traversal_bag_round_trips_images_and_ground_truth(
    tmp_path, query, images, storage, suffix, compressed
):
    bag = write_traversal_bag(
        query,
        tmp_path / 'bag',
        compressed=compressed,
        rate_hz=4.0,
        odom_topic='/odom',
        storage=storage,
    )
    assert len(list(bag.glob(f'*{suffix}'))) == 1
    image_topic = f'{IMAGE_TOPIC}/compressed' if compressed else IMAGE_TOPIC  # image_transport's
    assert bags.list_topics(bag) == {
        image_topic: bags.COMPRESSED_IMAGE if compressed else bags.IMAGE,
        '/ground_truth/pose': bags.POSE_STAMPED,
        '/odom': bags.ODOMETRY,
    }
    for pose_topic in ('/ground_truth/pose', '/odom'):
        frames = list(
            read_posed_images(
                bag, image_topic, pose_topic, min_distance_m=0.0, min_rotation_rad=0.0
            )
        )
        assert [f.stamp_ns for f in frames] == [T0_NS + i * 250_000_000 for i in range(4)]
        assert len({f.name for f in frames}) == 4
        for i, frame in enumerate(frames):
            assert frame.image_bgr.shape == images[i].shape
            error = np.abs(frame.image_bgr.astype(int) - images[i]).mean()
            assert error < 3.0 if compressed else error == 0.0
            assert (frame.pose.x, frame.pose.y) == pytest.approx(tuple(query.xy[i]), abs=1e-9)
            assert frame.pose.yaw_rad == pytest.approx(query.yaw_rad[i], abs=1e-9)


@pytest.mark.parametrize('encoding', ['bgr8', 'mono8', 'png', 'jpeg'])
def test_image_encodings_read_back_as_bgr(tmp_path, images, encoding):
    bag = tmp_path / 'bag'
    with BagWriter(bag) as writer:
        writer.write_image(IMAGE_TOPIC, ns(0), images[0], encoding=encoding)
        writer.write_pose('/pose', ns(0), Pose(0.0, 0.0))
    [frame] = read_posed_images(bag, IMAGE_TOPIC, '/pose')
    expected = images[0]
    if encoding == 'mono8':
        expected = cv2.cvtColor(cv2.cvtColor(images[0], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    error = np.abs(frame.image_bgr.astype(int) - expected).mean()
    assert frame.image_bgr.dtype == np.uint8
    assert frame.image_bgr.shape == expected.shape
    assert error < 3.0 if encoding == 'jpeg' else error == 0.0


def test_padded_image_rows_are_read_without_the_padding(tmp_path, images):
    rows = np.hstack([images[0].reshape(240, -1), np.zeros((240, 6), np.uint8)]).reshape(-1)
    with BagWriter(tmp_path / 'bag') as writer:
        header = writer._header(ns(0), 'camera')
        msg = writer._typestore.types[bags.IMAGE](header, 240, 426, 'bgr8', 0, 426 * 3 + 6, rows)
        writer._write(IMAGE_TOPIC, ns(0), msg)
        writer.write_pose('/pose', ns(0), Pose(0.0, 0.0))
    [frame] = read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose')
    np.testing.assert_array_equal(frame.image_bgr, images[0])


@pytest.mark.parametrize(('storage', 'suffix'), STORAGES)
@pytest.mark.parametrize('source', POSE_SOURCES)
def test_poses_are_interpolated_at_image_stamps_for_every_pose_source(
    tmp_path, images, caplog, source, storage, suffix
):
    poses = [
        (0.0, 0.0, 0.0, 0.0, 0.0),
        (1.0, 2.0, 0.0, 0.0, math.pi / 2),
        (2.0, 2.0, 4.0, 0.0, math.pi / 2),
        (3.0, 2.0, 4.0, 1.0, math.pi),
        (4.0, 2.0, 4.0, 1.0, -3 * math.pi / 4),
    ]  # the last turn crosses +-pi
    image_times = [-0.5, 0.25, 1.5, 2.75, 3.5, 4.5]  # the first and last lie outside the poses
    write_pose_bag(tmp_path / 'bag', images + images[:2], image_times, poses, source, storage)
    pose_topic = '/tf' if source.startswith('tf') else '/pose'
    base_frame = 'camera' if source == 'tf_chain' else 'base_link'
    with caplog.at_level(logging.INFO, logger='vlm_vpr.core.bags'):
        frames = list(
            read_posed_images(
                tmp_path / 'bag',
                IMAGE_TOPIC,
                pose_topic,
                base_frame=base_frame,
                min_distance_m=0.0,
                max_pose_gap_s=4.0,
            )
        )
    # By hand: linear position, yaw along the shorter arc between the two surrounding poses.
    expected = [
        (0.25, 0.5, 0.0, 0.0, math.pi / 8),
        (1.5, 2.0, 2.0, 0.0, math.pi / 2),
        (2.75, 2.0, 4.0, 0.75, 7 * math.pi / 8),
        (3.5, 2.0, 4.0, 1.0, 9 * math.pi / 8),
    ]
    pitch = 0.0
    if source == 'tf_chain':  # map->odom = (10 + t, -5) at yaw pi/2; then camera 0.5 m ahead
        pitch = CAMERA_PITCH_RAD
        expected = [
            (
                t,
                10.0 + t - y + 0.5 * math.cos(math.pi / 2 + yaw),
                -5.0 + x + 0.5 * math.sin(math.pi / 2 + yaw),
                z,
                math.pi / 2 + yaw,
            )
            for t, x, y, z, yaw in expected
        ]
    assert [f.stamp_ns for f in frames] == [ns(e[0]) for e in expected]
    for frame, (_, x, y, z, yaw) in zip(frames, expected, strict=True):
        assert (frame.pose.x, frame.pose.y, frame.pose.z) == pytest.approx((x, y, z), abs=1e-9)
        # yaw about z, then pitch about the new y: q = q_z(yaw) * q_y(pitch), as (x, y, z, w)
        cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
        cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
        quat = np.array([frame.pose.qx, frame.pose.qy, frame.pose.qz, frame.pose.qw])
        assert abs(quat @ [-sy * sp, cy * sp, sy * cp, cy * cp]) == pytest.approx(1.0, abs=1e-9)
    assert "'outside the pose time range': 2" in caplog.text
    np.testing.assert_array_equal(frames[0].image_bgr, images[1])


@pytest.mark.parametrize('source', [bags.POSE_STAMPED, 'tf'])
def test_zero_header_stamps_of_images_and_poses_fall_back_to_bag_time(
    tmp_path, images, monkeypatch, source
):
    header = BagWriter._header
    monkeypatch.setattr(BagWriter, '_header', lambda self, _, frame: header(self, 0, frame))
    poses = [(float(t), float(t), 0.0, 0.0, 0.0) for t in range(3)]
    write_pose_bag(tmp_path / 'bag', images[:2], [0.5, 1.5], poses, source)
    pose_topic = '/tf' if source == 'tf' else '/pose'
    frames = list(read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, pose_topic, min_distance_m=0))
    assert [f.stamp_ns for f in frames] == [ns(0.5), ns(1.5)]
    assert [f.pose.x for f in frames] == pytest.approx([0.5, 1.5])


@pytest.mark.parametrize('source', [bags.ODOMETRY, 'tf'])
def test_read_pose_track_gives_the_odometry_pose_at_any_stamp(tmp_path, source):
    """Odometry (odom -> base_link) as an Odometry topic or on /tf under map -> odom."""
    with BagWriter(tmp_path / 'bag') as writer:
        for t in range(3):
            odom = Pose.from_yaw(2.0 * t, 0.0, t * math.pi / 4)
            if source == 'tf':
                map_odom = ('map', 'odom', Pose(100.0, 0.0))  # the odometry's drift: not wanted
                writer.write_transforms(ns(t), [map_odom, ('odom', 'base_link', odom)])
            else:
                writer.write_pose('/odom', ns(t), odom, msgtype=source, frame_id='odom')
    pose_at = read_pose_track(tmp_path / 'bag', '/tf' if source == 'tf' else '/odom', 'odom')
    halfway = pose_at(ns(1.5))
    assert (halfway.x, halfway.y, halfway.yaw_rad) == pytest.approx((3.0, 0.0, 3 * math.pi / 8))
    assert pose_at(ns(2)).x == pytest.approx(4.0)
    assert pose_at(ns(2.5)) is None  # after the last pose
    with pytest.raises(BagError, match="both frames are 'odom'"):
        read_pose_track(tmp_path / 'bag', '/odom', 'odom', base_frame='odom')
    with pytest.raises(BagError, match='topic /nothing is not in the bag'):
        read_pose_track(tmp_path / 'bag', '/nothing', 'odom')


def test_a_tf_edge_on_both_tf_and_tf_static_is_one_moving_edge(tmp_path, images):
    with BagWriter(tmp_path / 'bag') as writer:
        writer.write_transforms(ns(0), [('base_link', 'camera', Pose(0.5, 0.0))], static=True)
        for t in range(2):
            writer.write_image(IMAGE_TOPIC, ns(t), images[t])
            transforms = [
                ('map', 'base_link', Pose(float(t), 0.0)),
                ('base_link', 'camera', Pose(0.5 + 0.2 * t, 0.0)),  # moves: not static
            ]
            writer.write_transforms(ns(t), transforms)
    frames = list(
        read_posed_images(
            tmp_path / 'bag', IMAGE_TOPIC, '/tf', base_frame='camera', min_distance_m=0
        )
    )
    assert [f.pose.x for f in frames] == pytest.approx([0.5, 1.7])


def test_frames_given_with_a_leading_slash_name_the_same_frames(tmp_path, images):
    with BagWriter(tmp_path / 'bag') as writer:  # a ROS 1 style bag: '/map', '/base_link'
        for t in range(2):
            writer.write_image(IMAGE_TOPIC, ns(t), images[t])
            writer.write_transforms(ns(t), [('/map', '/base_link', Pose(float(t), 0.0))])
    for map_frame, base_frame in (('map', 'base_link'), ('/map', '/base_link')):
        read = read_posed_images(
            tmp_path / 'bag',
            IMAGE_TOPIC,
            '/tf',
            map_frame=map_frame,
            base_frame=base_frame,
            min_distance_m=0,
        )
        assert [f.pose.x for f in read] == pytest.approx([0.0, 1.0]), map_frame


def test_a_republished_tf_static_edge_takes_its_latest_value_as_tf2_does(tmp_path, images):
    with BagWriter(tmp_path / 'bag') as writer:
        writer.write_transforms(ns(0), [('base_link', 'camera', Pose(0.5, 0.0))], static=True)
        corrected = [('base_link', 'camera', Pose(2.0, 0.0))]  # a re-calibrated mount
        writer.write_transforms(ns(0.1), corrected, static=True)
        for t in (1, 2):
            writer.write_image(IMAGE_TOPIC, ns(t), images[t - 1])
            writer.write_transforms(ns(t), [('map', 'base_link', Pose(10.0 * t, 0.0))])
    frames = read_posed_images(
        tmp_path / 'bag', IMAGE_TOPIC, '/tf', base_frame='camera', min_distance_m=0
    )
    assert [f.pose.x for f in frames] == pytest.approx([12.0, 22.0])


def test_images_in_a_gap_between_poses_are_skipped(tmp_path, images, caplog):
    poses = [(0.0, 0, 0, 0, 0), (1.0, 1, 0, 0, 0), (5.0, 5, 0, 0, 0), (6.0, 6, 0, 0, 0)]
    write_pose_bag(tmp_path / 'bag', images[:3], [0.5, 3.0, 5.5], poses, bags.POSE_STAMPED)
    with caplog.at_level(logging.INFO, logger='vlm_vpr.core.bags'):
        strict = list(
            read_posed_images(
                tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=0.0, max_pose_gap_s=1.5
            )
        )
    assert [f.pose.x for f in strict] == pytest.approx([0.5, 5.5])
    assert "'in a gap between poses': 1" in caplog.text
    loose = list(
        read_posed_images(
            tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=0.0, max_pose_gap_s=4.0
        )
    )
    assert [f.pose.x for f in loose] == pytest.approx([0.5, 3.0, 5.5])


def test_keyframes_are_chosen_by_distance_and_rotation(tmp_path, images):
    # 0.4 m steps along x for 10 frames, then 10 frames turning 0.1 rad each in place.
    path = [(0.4 * i, 0.0) for i in range(10)] + [(3.6, 0.1 * (i + 1)) for i in range(10)]
    times = [float(i) for i in range(len(path))]
    poses = [(t, x, 0.0, 0.0, yaw) for t, (x, yaw) in zip(times, path, strict=True)]
    write_pose_bag(tmp_path / 'bag', images * 5, times, poses, bags.POSE_STAMPED)
    frames = list(
        read_posed_images(
            tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=1.0, min_rotation_rad=0.25
        )
    )
    kept = [round((f.stamp_ns - T0_NS) / 1e9) for f in frames]
    # distance from the last keyframe reaches 1.2 m every 3 steps; the turn 0.3 rad every 3
    assert kept == [0, 3, 6, 9, 12, 15, 18]
    assert frames[0].name.startswith('000000_')
    every = list(
        read_posed_images(
            tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=0.0, min_rotation_rad=0.0
        )
    )
    assert len(every) == len(path)


def test_undecodable_compressed_image_is_skipped_and_the_rest_kept(tmp_path, images, caplog):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    types = store.types
    jpeg = cv2.imencode('.jpg', images[0])[1].reshape(-1)
    with Writer(tmp_path / 'bag', version=9) as writer:
        image_conn = writer.add_connection(IMAGE_TOPIC, bags.COMPRESSED_IMAGE, typestore=store)
        pose_conn = writer.add_connection('/pose', bags.POSE_STAMPED, typestore=store)
        for i, data in enumerate([jpeg, jpeg[:200], jpeg]):  # the middle JPEG is truncated
            header = types['std_msgs/msg/Header'](
                types['builtin_interfaces/msg/Time'](1000 + i, 0), 'camera'
            )
            msg = types[bags.COMPRESSED_IMAGE](header, 'jpeg', data)
            writer.write(image_conn, ns(i), store.serialize_cdr(msg, bags.COMPRESSED_IMAGE))
            pose = types[bags.POSE_STAMPED](
                header,
                types['geometry_msgs/msg/Pose'](
                    types['geometry_msgs/msg/Point'](float(i), 0.0, 0.0),
                    types['geometry_msgs/msg/Quaternion'](0.0, 0.0, 0.0, 1.0),
                ),
            )
            writer.write(pose_conn, ns(i), store.serialize_cdr(pose, bags.POSE_STAMPED))
    with caplog.at_level(logging.WARNING, logger='vlm_vpr.core.bags'):
        frames = list(
            read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=0.0)
        )
    assert [f.pose.x for f in frames] == [0.0, 2.0]
    assert 'message 1: cannot convert the image' in caplog.text


def test_images_that_all_fail_to_decode_are_blamed_on_their_format(tmp_path, images):
    with BagWriter(tmp_path / 'bag') as writer:
        for t in range(2):
            header = writer._header(ns(t), 'camera')
            garbage = np.frombuffer(b'\xff\xd8 not a jpeg', np.uint8)
            writer._write(
                IMAGE_TOPIC,
                ns(t),
                writer._typestore.types[bags.COMPRESSED_IMAGE](header, 'jpeg', garbage),
            )
            writer.write_pose('/pose', ns(t), Pose(float(t), 0.0))
    with pytest.raises(BagError, match=r"\{'undecodable': 2\}\); check the image encoding") as e:
        list(read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose', min_distance_m=0))
    assert 'pose topic' not in str(e.value)


def test_ros1_bag_gives_posed_images_but_no_raw_replay(tmp_path, images):
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    types = store.types
    bag = tmp_path / 'old.bag'
    with Writer(bag) as writer:
        image_conn = writer.add_connection(IMAGE_TOPIC, bags.IMAGE, typestore=store)
        pose_conn = writer.add_connection('/pose', bags.POSE_STAMPED, typestore=store)
        for i in range(2):
            header = types['std_msgs/msg/Header'](
                i, types['builtin_interfaces/msg/Time'](1000 + i, 0), '/map'
            )
            msg = types[bags.IMAGE](header, 240, 426, 'bgr8', 0, 426 * 3, images[i].reshape(-1))
            writer.write(image_conn, ns(i), store.serialize_ros1(msg, bags.IMAGE))
            pose = types[bags.POSE_STAMPED](
                header,
                types['geometry_msgs/msg/Pose'](
                    types['geometry_msgs/msg/Point'](float(i), 0.0, 0.0),
                    types['geometry_msgs/msg/Quaternion'](0.0, 0.0, 0.0, 1.0),
                ),
            )
            writer.write(pose_conn, ns(i), store.serialize_ros1(pose, bags.POSE_STAMPED))
    frames = list(read_posed_images(bag, IMAGE_TOPIC, '/pose', min_distance_m=0.0))
    assert [f.pose.x for f in frames] == [0.0, 1.0]
    np.testing.assert_array_equal(frames[1].image_bgr, images[1])
    with pytest.raises(BagError, match='ROS 1 bag; convert it to rosbag2 first'):
        next(bags.iter_bag_messages(bag))


def test_raw_messages_deserialize_with_rclpy(tmp_path, query):
    from geometry_msgs.msg import PoseStamped
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage

    bag = write_traversal_bag(
        query, tmp_path / 'bag', image_topic=IMAGE_TOPIC, compressed=True, odom_topic='/odom'
    )
    classes = {bags.COMPRESSED_IMAGE: CompressedImage, bags.POSE_STAMPED: PoseStamped}
    messages = list(bags.iter_bag_messages(bag, ['/ground_truth/pose', IMAGE_TOPIC]))
    assert [m[0] for m in messages] == [IMAGE_TOPIC, '/ground_truth/pose'] * 4
    assert [m[2] for m in messages] == sorted(m[2] for m in messages)
    for topic, msgtype, stamp_ns, cdr in messages:
        msg = deserialize_message(cdr, classes[msgtype])
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == stamp_ns
        assert msg.header.frame_id == ('camera' if topic == IMAGE_TOPIC else 'map')
    first_pose = deserialize_message(messages[1][3], PoseStamped).pose.position
    assert (first_pose.x, first_pose.y) == pytest.approx(tuple(query.xy[0]))
    jpeg = np.frombuffer(
        bytes(deserialize_message(messages[0][3], CompressedImage).data), np.uint8
    )
    assert cv2.imdecode(jpeg, cv2.IMREAD_COLOR).shape == (240, 426, 3)
    assert list(bags.iter_bag_messages(bag, [])) == []  # no topics: no messages


# --- error paths -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def small_bag(tmp_path_factory, query) -> Path:
    return write_traversal_bag(query, tmp_path_factory.mktemp('bags') / 'bag')


def test_missing_bag_is_reported(tmp_path):
    with pytest.raises(BagError, match='does not exist; give a rosbag2 folder'):
        read_posed_images(tmp_path / 'nope.mcap', IMAGE_TOPIC, '/pose')


def test_folder_without_metadata_is_not_a_bag(tmp_path):
    with pytest.raises(BagError, match=r'is not a readable ROS bag .*metadata'):
        bags.list_topics(tmp_path)


def test_missing_topic_lists_the_available_ones(small_bag):
    with pytest.raises(
        BagError,
        match=r'topic /nope is not in the bag; available topics: '
        r'/camera/image_raw \[sensor_msgs/msg/Image\]',
    ):
        read_posed_images(small_bag, '/nope', '/ground_truth/pose')
    with pytest.raises(BagError, match='topic /odom is not in the bag'):
        read_posed_images(small_bag, IMAGE_TOPIC, '/odom')
    with pytest.raises(BagError, match='topic /nope is not in the bag'):
        next(bags.iter_bag_messages(small_bag, ['/nope']))


def test_wrong_message_type_on_a_topic_is_reported(small_bag):
    with pytest.raises(
        BagError,
        match='/ground_truth/pose carries geometry_msgs/msg/PoseStamped; '
        'expected one of sensor_msgs/msg/Image',
    ):
        read_posed_images(small_bag, '/ground_truth/pose', '/ground_truth/pose')
    with pytest.raises(
        BagError,
        match='/camera/image_raw carries sensor_msgs/msg/Image; '
        'expected one of nav_msgs/msg/Odometry',
    ):
        read_posed_images(small_bag, IMAGE_TOPIC, IMAGE_TOPIC)


@pytest.mark.parametrize(('storage', 'suffix'), STORAGES)
@pytest.mark.parametrize('fraction', [0.05, 0.6, 0.98])
def test_truncated_or_corrupt_bag_file_is_reported(tmp_path, query, storage, suffix, fraction):
    bag = write_traversal_bag(query, tmp_path / 'bag', storage=storage)
    broken = truncate(bag, suffix, fraction)
    with pytest.raises(BagError, match='is not a readable ROS bag'):
        read_posed_images(broken, IMAGE_TOPIC, '/ground_truth/pose')
    broken.replace(next(bag.glob(f'*{suffix}')))  # the same damage inside the bag folder
    with pytest.raises(BagError, match='is not a readable ROS bag'):
        bags.list_topics(bag)


def test_pose_topic_without_messages_means_no_poses(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(tmp_path / 'bag', version=9) as writer:
        writer.add_connection(IMAGE_TOPIC, bags.IMAGE, typestore=store)
        writer.add_connection('/pose', bags.POSE_STAMPED, typestore=store)
    with pytest.raises(BagError, match='no poses on /pose: the topic has no messages'):
        read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose')


def test_an_image_topic_without_messages_is_named_as_empty(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(tmp_path / 'bag', version=9) as writer:
        writer.add_connection(IMAGE_TOPIC, bags.IMAGE, typestore=store)
        pose = writer.add_connection('/pose', bags.POSE_STAMPED, typestore=store)
        for t in range(2):
            msg = store.types[bags.POSE_STAMPED](
                header=store.types['std_msgs/msg/Header'](
                    stamp=store.types['builtin_interfaces/msg/Time'](sec=t, nanosec=0),
                    frame_id='map',
                ),
                pose=store.types['geometry_msgs/msg/Pose'](
                    position=store.types['geometry_msgs/msg/Point'](x=float(t), y=0.0, z=0.0),
                    orientation=store.types['geometry_msgs/msg/Quaternion'](
                        x=0.0, y=0.0, z=0.0, w=1.0
                    ),
                ),
            )
            writer.write(pose, ns(t), store.serialize_cdr(msg, bags.POSE_STAMPED))
    with pytest.raises(BagError, match=f'topic {IMAGE_TOPIC} has no messages in the bag'):
        list(read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose'))


def test_nan_poses_mean_no_poses(tmp_path, images):
    write_pose_bag(
        tmp_path / 'bag', images[:1], [0.0], [(0.0, math.nan, 0.0, 0.0, 0.0)], bags.ODOMETRY
    )
    with pytest.raises(BagError, match='no poses on /pose: every map->base_link pose is NaN'):
        read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose')


def test_tf_without_a_chain_to_the_base_frame_means_no_poses(tmp_path, images):
    poses = [(0.0, 0, 0, 0, 0), (1.0, 1, 0, 0, 0)]
    write_pose_bag(tmp_path / 'bag', images[:2], [0.0, 1.0], poses, 'tf')
    with pytest.raises(
        BagError,
        match=r'no poses: TF on /tf has no chain map -> base_footprint '
        r"\(no parent of 'base_footprint'; transforms: "
        r'map->base_link\)',
    ):
        read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/tf', base_frame='base_footprint')


def test_a_tf_cycle_and_equal_map_and_base_frames_are_reported(tmp_path, images):
    with BagWriter(tmp_path / 'bag') as writer:
        writer.write_image(IMAGE_TOPIC, ns(0), images[0])
        edges = [('odom', 'base_link'), ('base_link', 'odom')]
        writer.write_transforms(ns(0), [(a, b, Pose(0.0, 0.0)) for a, b in edges])
    with pytest.raises(BagError, match=r'\(a cycle base_link -> odom -> base_link;'):
        read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/tf')
    for map_frame in ('map', '/map'):  # the same frame, with or without a leading '/'
        with pytest.raises(BagError, match="both frames are 'map'; give two frames"):
            read_posed_images(
                tmp_path / 'bag', IMAGE_TOPIC, '/tf', map_frame=map_frame, base_frame='map'
            )


def test_images_that_all_miss_the_pose_time_range_are_reported(tmp_path, images):
    poses = [(0.0, 0, 0, 0, 0), (1.0, 1, 0, 0, 0)]
    write_pose_bag(tmp_path / 'bag', images[:2], [5.0, 6.0], poses, bags.POSE_STAMPED)
    frames = read_posed_images(tmp_path / 'bag', IMAGE_TOPIC, '/pose')
    with pytest.raises(
        BagError,
        match=r'no image on /camera/image_raw has a pose \(2 images; '
        r"skipped: \{'outside the pose time range': 2\}\)",
    ):
        list(frames)


def test_writer_refuses_existing_paths_and_unknown_choices(tmp_path, query, images):
    with pytest.raises(BagError, match='exists; choose a new bag path'):
        write_traversal_bag(query, tmp_path)
    with pytest.raises(BagError, match="storage 'rosbag' is not one of"):
        write_traversal_bag(query, tmp_path / 'a', storage='rosbag')
    with pytest.raises(BagError, match='rate_hz must be > 0'):
        write_traversal_bag(query, tmp_path / 'b', rate_hz=0.0)
    with (
        pytest.raises(BagError, match="image encoding 'rgb16' is not one of"),
        BagWriter(tmp_path / 'c') as writer,
    ):
        writer.write_image(IMAGE_TOPIC, ns(0), images[0], encoding='rgb16')
    assert not (tmp_path / 'c').exists()  # a failed write leaves no half bag behind
    with pytest.raises(BagError, match='min_distance_m and min_rotation_rad must be >= 0'):
        read_posed_images(tmp_path / 'x', IMAGE_TOPIC, '/pose', min_distance_m=-1.0)


@pytest.mark.parametrize(
    ('msgtype', 'message'),
    [
        (bags.ODOMETRY, "are of frame 'base_link', not base_frame 'camera': used as they are"),
        (bags.POSE_STAMPED, "name no child frame: base_frame 'camera' has no effect"),
        (bags.POSE_WITH_COVARIANCE_STAMPED, "name no child frame: base_frame 'camera' has no"),
    ],
)
def test_poses_are_used_as_they_are_with_a_warning_when_they_are_not_of_base_frame(
    tmp_path, images, caplog, msgtype, message
):
    """Odometry of base_link read for base_frame 'camera'; PoseStamped (no child frame) read
    with a base_frame given: only /tf gives the pose of another frame."""
    poses = [(0.0, 0, 0, 0, 0), (1.0, 1, 0, 0, 0)]
    write_pose_bag(tmp_path / 'bag', images[:2], [0.0, 1.0], poses, msgtype)
    for base_frame, warned in ((bags.BASE_FRAME, False), ('camera', True)):
        caplog.clear()
        with caplog.at_level('WARNING', logger='vlm_vpr.core.bags'):
            frames = read_posed_images(
                tmp_path / 'bag', IMAGE_TOPIC, '/pose', base_frame=base_frame, min_distance_m=0
            )
        assert [f.pose.x for f in frames] == pytest.approx([0.0, 1.0])
        assert (message in caplog.text) == warned, base_frame
