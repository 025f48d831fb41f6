"""Bad input never stops the node: each bad frame is logged, counted in /diagnostics and
skipped, and the next good frame is localised. Also: a 100 Hz flood, a missing TF, and one
ambiguous frame inside a sequence (real rclpy, in-process node)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from nav_msgs.msg import Odometry
from rclpy.parameter import Parameter
from ros_doubles import IDENTITY, TfLookupDouble
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.errors import ImageError
from vlm_vpr.core.images import read_image
from vlm_vpr.ros.conversions import stamp_ns
from vlm_vpr.ros.harness import NodeHarness, camera_msg, header_at, odometry_msg, wait_until
from vlm_vpr.ros.node import RECEIPTS_KEPT, STALE_MIN_S, camera_silence, record_receipt
from vlm_vpr.ros.tf_adapter import tf_available

T0_NS = 1_700_000_000_000_000_000
COMPRESSED_TOPIC = 'camera2/image/compressed'
MAX_RATE_HZ = 2.0


@pytest.fixture(scope='module')
def queries(data_root: Path) -> Traversal:
    return read_traversal(data_root / 'campus_loop' / 'query')


@pytest.fixture(scope='module')
def good(queries: Traversal) -> np.ndarray:
    return read_image(queries.image_paths[4])


@pytest.fixture(scope='module')
def harness(campus_map: Path) -> NodeHarness:
    with NodeHarness(
        {
            'map_path': str(campus_map),
            'autostart': True,
            'image_topics': ['image', COMPRESSED_TOPIC],
            'max_rate_hz': MAX_RATE_HZ,
        }
    ) as running:
        running.pubs = {
            'image': running.publisher(Image, 'image'),
            'compressed': running.publisher(CompressedImage, COMPRESSED_TOPIC),
        }
        yield running


def localise_good_frame(harness: NodeHarness, image: np.ndarray, stamp: int) -> Any:
    time.sleep(1.0 / MAX_RATE_HZ)  # let the rate limit pass so the bad frame is not replaced
    harness.pubs['image'].publish(camera_msg(image, stamp))
    return harness.wait_for_pose(stamp)


def wrong_encoding(image: np.ndarray) -> Image:
    msg = camera_msg(image, T0_NS)
    msg.encoding = 'yuv-weird'
    return msg


def zero_size(image: np.ndarray) -> Image:
    return Image(header=header_at(T0_NS, 'camera'), height=0, width=0, encoding='bgr8')


def truncated_jpeg(image: np.ndarray) -> CompressedImage:
    msg = camera_msg(image, T0_NS, compressed=True)
    msg.data = bytes(msg.data[: len(msg.data) // 3])
    return msg


def black_frame(image: np.ndarray) -> Image:  # a lens cap: decodes, but shows nothing
    return camera_msg(np.zeros_like(image), T0_NS)


def huge_png(image: np.ndarray) -> CompressedImage:
    data = cv2.imencode('.png', np.full((10000, 10000), 128, np.uint8))[1].tobytes()
    return CompressedImage(header=header_at(T0_NS, 'camera'), format='png', data=data)


@pytest.mark.parametrize(
    ('make', 'reason'),
    [
        (wrong_encoding, 'bad_encoding'),
        (zero_size, 'empty'),
        (truncated_jpeg, 'corrupt'),
        (huge_png, 'too_large'),
        (black_frame, 'no_features'),
    ],
)
def test_a_bad_frame_is_logged_counted_and_skipped_and_the_next_good_frame_localised(
    harness: NodeHarness,
    good: np.ndarray,
    make: Any,
    reason: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    key = f'skipped_{reason}'
    before = harness.node.counts().get(key, 0)
    msg = make(good)
    harness.pubs['compressed' if isinstance(msg, CompressedImage) else 'image'].publish(msg)
    stamp = T0_NS + (1 + len(reason)) * 1_000_000_000
    assert localise_good_frame(harness, good, stamp) is not None, 'the node stopped localising'
    assert harness.node.counts().get(key, 0) == before + 1
    assert f'frame skipped ({reason})' in capfd.readouterr().err
    harness.node.publish_diagnostics()
    diagnostics = harness.wait_for(
        '/diagnostics',
        lambda m: any(kv.key == key and int(kv.value) == before + 1 for kv in m.status[0].values),
        5.0,
    )
    assert diagnostics is not None


def test_a_camera_whose_frames_are_skipped_warns_while_another_camera_localises(
    harness: NodeHarness, good: np.ndarray
) -> None:
    """The status names the failing camera even though the other one's frames came later."""
    bad = T0_NS + 8000 * 1_000_000_000
    corrupt = harness.node.counts().get('skipped_corrupt', 0)
    harness.pubs['compressed'].publish(truncated_jpeg(good))
    assert wait_until(lambda: harness.node.counts().get('skipped_corrupt', 0) > corrupt, 30.0)
    assert localise_good_frame(harness, good, bad) is not None  # on the other camera
    level, message = harness.node.status
    assert level == b'\x01'  # WARN, not OK 'localising'
    assert message == f'{COMPRESSED_TOPIC}: last frame skipped (corrupt)'
    harness.node.publish_diagnostics()
    key = f'camera {COMPRESSED_TOPIC}'
    msg = harness.wait_for(
        '/diagnostics',
        lambda m: any(kv.key == key and 'corrupt' in kv.value for kv in m.status[0].values),
        5.0,
    )
    assert msg is not None
    values = {kv.key: kv.value for kv in msg.status[0].values}
    assert values['camera image'] == 'localising'
    time.sleep(1.0 / MAX_RATE_HZ)
    harness.pubs['image'].publish(camera_msg(good, bad + 1))  # neither camera is silent
    harness.pubs['compressed'].publish(camera_msg(good, bad + 2, compressed=True))
    assert harness.wait_for_pose(bad + 1) and harness.wait_for_pose(bad + 2)
    assert harness.node.status == (b'\x00', 'localising')


def test_a_camera_is_stale_after_no_frame_for_three_seconds_or_five_of_its_usual_gaps() -> None:
    s = 1_000_000_000
    fast = [0, s // 10, 2 * s // 10, 3 * s // 10, 5 * s]  # every 0.1 s (median), one pause
    assert camera_silence(fast, 5 * s + 3 * s) is None  # 5 gaps = 0.5 s: the 3 s minimum holds
    assert camera_silence(fast, 5 * s + 3 * s + 1) == pytest.approx((3.0, 0.1))
    slow = [0, s, 2 * s]  # every 1 s: stale after 5 s
    assert camera_silence(slow, 2 * s + 5 * s) is None
    assert camera_silence(slow, 2 * s + 5 * s + 1) == pytest.approx((5.0, 1.0))
    assert camera_silence([0], 100 * s) is None  # one frame: no gap to judge by
    assert camera_silence([], 100 * s) is None
    assert camera_silence(slow, 0) is None  # the clock went back before the last frame
    receipts: deque[int] = deque(maxlen=RECEIPTS_KEPT)
    for n in range(3 * RECEIPTS_KEPT):
        record_receipt(receipts, 100 * s + n * s // 10)
    assert len(receipts) == RECEIPTS_KEPT
    record_receipt(receipts, 3 * s)  # a looped bag: the record restarts
    assert list(receipts) == [3 * s]
    assert camera_silence(receipts, 100 * s) is None


def test_a_camera_that_stops_sending_warns_as_stale_until_its_frames_come_again(
    harness: NodeHarness, good: np.ndarray
) -> None:
    stamp = T0_NS + 9000 * 1_000_000_000
    frames = {
        'image': camera_msg(good, stamp),
        'compressed': camera_msg(good, stamp, compressed=True),
    }

    def send(names: list[str], until: Any, timeout_s: float) -> bool:
        """Publish on each of ``names`` at about 20 Hz until ``until()`` or the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in names:
                harness.pubs[name].publish(frames[name])
            if until():
                return True
            time.sleep(0.05)
        return False

    def warned() -> dict[str, str]:  # camera -> state, for each camera the status names
        level, message = harness.node.status
        return dict(p.split(': ', 1) for p in message.split('; ')) if level == b'\x01' else {}

    received = harness.node.counts().get('received', 0)
    # a full record of both cameras at 20 Hz, each localised at least once (max_rate_hz 2)
    assert send(
        ['image', 'compressed'],
        lambda: (
            harness.node.counts().get('received', 0) >= received + 2 * (RECEIPTS_KEPT + 2)
            and harness.node.status == (b'\x00', 'localising')
        ),
        5.0,
    )
    began = time.monotonic()
    assert send(['image'], lambda: 'no frame for' in warned().get(COMPRESSED_TOPIC, ''), 6.0)
    assert time.monotonic() - began >= STALE_MIN_S - 0.1  # not before 3 s without a frame
    states = warned()
    assert list(states) == [COMPRESSED_TOPIC]  # the other camera is not named
    assert re.fullmatch(
        r'no frame for \d+\.\d s \(usually every 0\.\d\d s\)', states[COMPRESSED_TOPIC]
    )
    harness.node.publish_diagnostics()
    key = f'camera {COMPRESSED_TOPIC}'
    assert harness.wait_for(
        '/diagnostics',
        lambda m: any(kv.key == key and 'no frame for' in kv.value for kv in m.status[0].values),
        2.0,
    )
    assert send(
        ['image', 'compressed'], lambda: harness.node.status == (b'\x00', 'localising'), 2.0
    )


def test_a_100_hz_flood_drops_stale_frames_keeps_the_rate_and_localises_the_newest(
    harness: NodeHarness, good: np.ndarray
) -> None:
    before = harness.node.counts()
    start = T0_NS + 1000 * 1_000_000_000
    frames = [camera_msg(good, start + n * 10_000_000) for n in range(100)]
    began = time.monotonic()
    for msg in frames:
        harness.pubs['image'].publish(msg)
        time.sleep(0.01)
    last = stamp_ns(frames[-1].header)
    assert harness.wait_for_pose(last) is not None
    elapsed = time.monotonic() - began
    after = harness.node.counts()
    # counts() holds only the counters raised so far: none before this test's first frame
    received = after.get('received', 0) - before.get('received', 0)
    localized = after.get('localized', 0) - before.get('localized', 0)
    dropped = after.get('dropped', 0) - before.get('dropped', 0)
    assert received >= 50, 'the callbacks did not keep up with the flood'
    assert dropped >= received - localized - 1 and dropped >= 40
    assert localized <= elapsed * MAX_RATE_HZ + 2, 'max_rate_hz not honoured'


class HoldFirstCall:
    """Called from a test double in the node's worker: the first call waits there until the
    node has received ``frames`` frames since, so frames published meanwhile queue up together
    whatever the machine's load (``entered`` is set when the worker is inside)."""

    def __init__(self, harness: NodeHarness, frames: int) -> None:
        self.harness, self.target = harness, harness.node.counts().get('received', 0) + frames
        self.entered, self.calls = threading.Event(), 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert wait_until(
                lambda: self.harness.node.counts().get('received', 0) >= self.target, 30.0
            )


def send_as_one_batch(
    harness: NodeHarness,
    monkeypatch: pytest.MonkeyPatch,
    primer: int,
    good: np.ndarray,
    other: np.ndarray,
) -> list[int]:
    """Publish a primer frame and, while the worker holds it, ``good`` on the first camera and
    ``other`` on the second (stamps primer + 1, + 2), so that those two wait as one batch.
    Returns the list the extractor appends each batch's size to."""
    assert wait_until(lambda: not harness.node._slots, 10.0)  # no earlier test's frame waits
    extractor = harness.node._localizer.extractor
    batch_sizes: list[int] = []
    hold = HoldFirstCall(harness, frames=3)

    def counting_extract(images: list[np.ndarray]) -> Any:
        batch_sizes.append(len(images))
        hold()
        return type(extractor).extract(extractor, images)

    monkeypatch.setattr(extractor, 'extract', counting_extract)
    time.sleep(1.0 / MAX_RATE_HZ)
    harness.pubs['image'].publish(camera_msg(good, primer))
    assert hold.entered.wait(30.0)  # the worker is busy with the primer: both frames wait
    harness.pubs['image'].publish(camera_msg(good, primer + 1))
    harness.pubs['compressed'].publish(camera_msg(other, primer + 2, compressed=True))
    return batch_sizes


def test_frames_of_two_cameras_waiting_together_are_extracted_as_one_batch(
    harness: NodeHarness, good: np.ndarray, queries: Traversal, monkeypatch: pytest.MonkeyPatch
) -> None:
    primer = T0_NS + 1500 * 1_000_000_000
    other = read_image(queries.image_paths[20])
    batch_sizes = send_as_one_batch(harness, monkeypatch, primer, good, other)
    poses = {stamp: harness.wait_for_pose(stamp) for stamp in (primer, primer + 1, primer + 2)}

    assert batch_sizes == [1, 2]
    assert all(p is not None for p in poses.values())
    for stamp, truth in ((primer + 1, queries.xy[4]), (primer + 2, queries.xy[20])):
        p = poses[stamp].pose.pose.position
        assert math.hypot(p.x - truth[0], p.y - truth[1]) <= 5.0


def test_a_blank_camera_in_a_batch_is_skipped_and_the_others_are_extracted_once(
    harness: NodeHarness, good: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lens cap on one camera of several costs no second extraction of the others."""
    before = harness.node.counts().get('skipped_no_features', 0)
    primer = T0_NS + 1600 * 1_000_000_000
    batch_sizes = send_as_one_batch(harness, monkeypatch, primer, good, np.zeros_like(good))
    assert harness.wait_for_pose(primer + 1) is not None
    assert wait_until(
        lambda: harness.node.counts().get('skipped_no_features', 0) == before + 1, 10.0
    )
    assert batch_sizes == [1, 2]  # the primer, then the batch: nothing extracted again
    assert not [m for m in harness.messages('pose') if stamp_ns(m.header) == primer + 2]


def test_a_batch_the_localizer_rejects_is_retried_frame_by_frame(
    harness: NodeHarness, good: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    localizer = harness.node._localizer
    localize_batch, batch_sizes = localizer.localize_batch, []
    small = cv2.resize(good, (good.shape[1] // 2, good.shape[0] // 2))

    def rejects_the_small_frame(images: list[np.ndarray], *args: Any) -> Any:
        """Test double: the Localizer fails on any batch holding the half-size frame."""
        batch_sizes.append(len(images))
        if any(image.shape == small.shape for image in images):
            raise ImageError('rejected by the test double')
        return localize_batch(images, *args)

    monkeypatch.setattr(localizer, 'localize_batch', rejects_the_small_frame)
    before = harness.node.counts().get('skipped_localize_error', 0)
    primer = T0_NS + 1700 * 1_000_000_000
    send_as_one_batch(harness, monkeypatch, primer, good, small)
    assert harness.wait_for_pose(primer) is not None

    assert harness.wait_for_pose(primer + 1) is not None
    assert wait_until(
        lambda: harness.node.counts().get('skipped_localize_error', 0) == before + 1, 10.0
    )
    assert batch_sizes == [1, 2, 1, 1]  # the batch, then each frame alone
    assert not [m for m in harness.messages('pose') if stamp_ns(m.header) == primer + 2]


def test_a_bug_while_publishing_costs_that_frame_only(
    harness: NodeHarness, good: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish, failures = harness.node._publish, []

    def fails_once(*args: Any) -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError('a bug')
        publish(*args)

    monkeypatch.setattr(harness.node, '_publish', fails_once)
    before = harness.node.counts().get('skipped_internal_error', 0)
    stamp = T0_NS + 2500 * 1_000_000_000
    time.sleep(1.0 / MAX_RATE_HZ)
    harness.pubs['image'].publish(camera_msg(good, stamp))
    assert wait_until(
        lambda: harness.node.counts().get('skipped_internal_error', 0) == before + 1, 10.0
    )
    assert localise_good_frame(harness, good, stamp + 1) is not None


def test_on_demand_mode_localises_only_for_a_relocalize_call(
    harness: NodeHarness, good: np.ndarray
) -> None:
    harness.node.set_parameters([Parameter('mode', value='on_demand')])
    try:
        idle = T0_NS + 2000 * 1_000_000_000
        ignored = harness.node.counts().get('ignored_on_demand', 0)
        harness.pubs['image'].publish(camera_msg(good, idle))
        assert wait_until(
            lambda: harness.node.counts().get('ignored_on_demand', 0) > ignored, 30.0
        )
        assert not [m for m in harness.messages('pose') if stamp_ns(m.header) == idle]
        pending = harness.call_in_background(Trigger, 'relocalize')
        assert wait_until(lambda: bool(harness.node._waiters), 30.0)
        for n in range(3):  # relocalize_frames (default 3) frames answer the call
            stamp = idle + (n + 1) * 1_000_000_000
            assert localise_good_frame(harness, good, stamp) is not None
        assert json.loads(pending.result(timeout=30.0).message)['frames'] == 3
    finally:
        harness.node.set_parameters([Parameter('mode', value='continuous')])


def test_debug_image_shows_the_query_beside_its_best_match(
    harness: NodeHarness, good: np.ndarray
) -> None:
    harness.node.set_parameters([Parameter('debug_image', value=True)])
    stamp = T0_NS + 3000 * 1_000_000_000
    assert localise_good_frame(harness, good, stamp) is not None
    msg = harness.wait_for('debug_image', lambda m: stamp_ns(m.header) == stamp, 5.0)
    assert msg is not None and msg.encoding == 'bgr8' and msg.height == 240
    assert msg.width > good.shape[1] * 1.5  # the query (426 px) and a map thumbnail
    harness.node.set_parameters([Parameter('debug_image', value=False)])


def test_a_missing_transform_skips_the_frame_until_tf_arrives(
    campus_map: Path, good: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    tf = TfLookupDouble()
    tf.transforms[('base_link', 'camera')] = {}  # the camera mount is not published (yet)
    parameters = {'map_path': str(campus_map), 'autostart': True, 'use_tf': True}
    with NodeHarness(parameters, tf_lookup=tf, namespace='tf_test') as harness:
        pub = harness.publisher(Image, 'image')
        pub.publish(camera_msg(good, T0_NS))
        assert harness.wait_for('pose', lambda m: True, timeout_s=3.0) is None
        assert harness.node.counts().get('skipped_no_transform') == 1
        err = capfd.readouterr().err
        assert "frame skipped (no_transform): no TF from 'base_link' to 'camera'" in err
        assert 'publish the camera mount (robot_state_publisher)' in err
        tf.transforms[('base_link', 'camera')] = {None: (2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)}
        pub.publish(camera_msg(good, T0_NS + 1_000_000_000))
        moved = harness.wait_for('pose', lambda m: True, timeout_s=30.0)
        assert moved is not None and tf.calls[-1] == ('base_link', 'camera', None)  # latest
        tf.transforms.clear()  # the camera on the base origin: the pose moves by the lever arm
        pub.publish(camera_msg(good, T0_NS + 2_000_000_000))
        last = T0_NS + 2_000_000_000
        plain = harness.wait_for_pose(last)
    a, b = plain.pose.pose.position, moved.pose.pose.position
    assert math.hypot(a.x - b.x, a.y - b.y) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.skipif(tf_available(), reason='tf2_ros is installed: the TF adapter is used')
def test_use_tf_without_tf2_falls_back_to_the_camera_offset_parameters(
    campus_map: Path, harness: NodeHarness, good: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    stamp = T0_NS + 5000 * 1_000_000_000
    plain = localise_good_frame(harness, good, stamp)  # camera_offset all zero
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'use_tf': True,
        'camera_offset.x_m': 2.0,
    }
    with NodeHarness(parameters, namespace='no_tf2_test') as fallback:
        fallback.publisher(Image, 'image').publish(camera_msg(good, stamp))
        moved = fallback.wait_for_pose(stamp)
    assert 'use_tf is set but tf2_ros is not installed' in capfd.readouterr().err
    assert plain is not None and moved is not None
    a, b = plain.pose.pose.position, moved.pose.pose.position
    assert math.hypot(a.x - b.x, a.y - b.y) == pytest.approx(2.0, abs=1e-6)  # 2 m lever arm


@pytest.mark.skipif(tf_available(), reason='tf2_ros is installed: the TF adapter is used')
def test_odom_frame_without_tf2_votes_in_frame_order(
    campus_map: Path, good: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'odom_frame': 'odom',
        'sequence.length': 2,
        'max_rate_hz': 50.0,
    }
    with NodeHarness(parameters, namespace='no_tf2_motion') as harness:
        pub = harness.publisher(Image, 'image')
        for n in range(2):
            stamp = T0_NS + n * 1_000_000_000
            pub.publish(camera_msg(good, stamp))
            assert harness.wait_for_pose(stamp)
        assert harness.node._odometry_source is None
    assert 'odom_frame is set but tf2_ros is not installed: frames vote in frame order' in (
        capfd.readouterr().err
    )


def odom_tf(queries: Traversal, stamps: list[int], places: list[int]) -> TfLookupDouble:
    """TF odom -> base_link with the robot at query ``places[i]``'s pose at ``stamps[i]``."""
    tf = TfLookupDouble()
    poses = [queries.pose(place) for place in places]
    tf.transforms[('odom', 'base_link')] = {
        stamp: (p.x, p.y, p.z, p.qx, p.qy, p.qz, p.qw) for stamp, p in zip(stamps, poses)
    }
    return tf


def record_travel(node: Any) -> list[float | None]:
    """The distance travelled that each vote of the 'image' camera's sequence is given."""
    matcher, steps = node._matchers['image'], []
    vote = matcher.update
    matcher.update = lambda result, travelled, *a: (
        steps.append(travelled) or vote(result, travelled, *a)
    )
    return steps


@pytest.mark.parametrize('motion', ['odom_topic', 'odom_frame'])
def test_one_ambiguous_frame_cannot_flip_the_sequence_vote(
    motion: str, campus_map: Path, queries: Traversal
) -> None:
    """Frames 10..13 (a stop at 11) then a frame of a place 50 m away (query 30) where
    odometry says the robot reached query 14's place: the voted pose stays on the robot's
    route, and the sequence votes with the distances the robot moved. The motion comes from
    nav_msgs/Odometry messages (odom_topic) or from TF odom -> base_link (odom_frame; tf2 is
    stood in for by TfLookupDouble)."""
    route = [(10, 10), (11, 11), (11, 11), (12, 12), (13, 13), (30, 14)]  # (shown, true place)
    stamps = [T0_NS + n * 1_000_000_000 for n in range(len(route))]
    tf = odom_tf(queries, stamps, [place for _, place in route])
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        motion: 'odom',
        'max_rate_hz': 50.0,
        'sequence.length': 4,
    }
    with NodeHarness(parameters, tf_lookup=tf, namespace='sequence_test') as harness:
        pubs = (harness.publisher(Image, 'image'), harness.publisher(Odometry, 'odom'))
        steps = record_travel(harness.node)
        for stamp, (shown, place) in zip(stamps, route):
            if motion == 'odom_topic':
                odometry = harness.node.counts().get('odometry', 0)
                pubs[1].publish(odometry_msg(queries.pose(place), stamp))
                assert wait_until(
                    lambda o=odometry: harness.node.counts().get('odometry', 0) > o, 10.0
                )
            pubs[0].publish(camera_msg(read_image(queries.image_paths[shown]), stamp))
            msg = harness.wait_for_pose(stamp)
            assert msg is not None
        p = msg.pose.pose.position
        assert harness.node.counts().get('motion_unknown', 0) == 0
        stamp = stamps[-1] + 1_000_000_000  # no odometry message, no TF at this stamp
        calls = len(tf.calls)
        pubs[0].publish(camera_msg(read_image(queries.image_paths[15]), stamp))
        assert harness.wait_for_pose(stamp)
        assert harness.node.counts().get('motion_unknown', 0) == 1  # once a frame
        if motion == 'odom_frame':  # without a pose now, the earlier stamps are not looked up
            assert [s for target, _, s in tf.calls[calls:] if target == 'odom'] == [stamp]
    places = [place for _, place in route]
    assert steps[0] is None and steps[-1] is None  # the first frame; the one without motion
    assert (
        steps[1:-1]
        == pytest.approx(  # includes 0.0 for the stop
            [math.hypot(*(queries.xy[b] - queries.xy[a])) for a, b in zip(places, places[1:])]
        )
    )
    assert math.hypot(p.x - queries.xy[14, 0], p.y - queries.xy[14, 1]) <= 10.0
    assert math.hypot(p.x - queries.xy[30, 0], p.y - queries.xy[30, 1]) > 20.0
    assert math.hypot(*(queries.xy[30] - queries.xy[14])) > 40.0  # the frames really differ
    asked = {(target, source) for target, source, _ in tf.calls}
    assert asked == ({('odom', 'base_link')} if motion == 'odom_frame' else set())


def test_a_frame_skipped_after_its_sequence_vote_still_ends_the_step_it_moved(
    campus_map: Path, queries: Traversal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames at places 10, 11, 12; the second is voted, then refused (invalid_output). The
    third's vote gets the motion since the second (which the sequence holds), not since the
    first."""
    from vlm_vpr.ros import node as node_module

    stamps = [T0_NS + n * 1_000_000_000 for n in range(3)]
    places = [10, 11, 12]
    tf = odom_tf(queries, stamps, places)
    check = node_module.check_output

    def refuse_second(pose: Any, covariance: Any) -> None:
        check(pose, covariance)
        if len(steps) == 2:
            check(pose, covariance * math.nan)  # raises FrameSkipped('invalid_output')

    monkeypatch.setattr(node_module, 'check_output', refuse_second)
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'odom_frame': 'odom',
        'max_rate_hz': 50.0,
        'sequence.length': 3,
    }
    with NodeHarness(parameters, tf_lookup=tf, namespace='skipped_vote_test') as harness:
        pub = harness.publisher(Image, 'image')
        steps = record_travel(harness.node)
        for stamp, place in zip(stamps, places):
            skipped = harness.node.counts().get('skipped_invalid_output', 0)
            pub.publish(camera_msg(read_image(queries.image_paths[place]), stamp))
            assert wait_until(
                lambda s=stamp, k=skipped: (
                    any(stamp_ns(m.header) == s for m in harness.messages('pose'))
                    or harness.node.counts().get('skipped_invalid_output', 0) > k
                ),
                30.0,
            )
        assert harness.node.counts().get('skipped_invalid_output', 0) == 1
    assert steps[0] is None and steps[1:] == pytest.approx(
        [math.hypot(*(queries.xy[b] - queries.xy[a])) for a, b in zip(places, places[1:])]
    )


def test_an_exception_in_a_transition_is_logged_and_named_in_the_status(
    harness: NodeHarness, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """rclpy turns an exception in a transition callback into ERROR without a log line."""
    from rclpy.lifecycle import TransitionCallbackReturn

    node = harness.node
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('no more subscriptions')

    monkeypatch.setattr(node, 'create_subscription', broken)
    try:
        assert node.trigger_activate() != TransitionCallbackReturn.SUCCESS
        err = capfd.readouterr().err
        assert 'on_activate failed' in err and 'RuntimeError: no more subscriptions' in err
        level, message = node.status
        assert level == b'\x02'  # ERROR
        assert message == (
            'recovered from on_activate raised RuntimeError: no more subscriptions: unconfigured'
        )
    finally:
        monkeypatch.undo()
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert wait_until(lambda: harness.pubs['image'].get_subscription_count() > 0, 10.0)
    assert node.status[0] == b'\x00'


def test_a_camera_that_has_sent_nothing_warns_while_another_localises(
    harness: NodeHarness, good: np.ndarray
) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = harness.node
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS  # no frame from either
    assert wait_until(lambda: harness.pubs['image'].get_subscription_count() > 0, 10.0)
    assert node.status == (b'\x00', 'active, waiting for images')
    assert localise_good_frame(harness, good, T0_NS + 9900 * 1_000_000_000) is not None
    assert node.status == (b'\x01', f'{COMPRESSED_TOPIC}: no frame yet')


def test_node_goes_through_deactivate_cleanup_configure_activate_and_localises_again(
    harness: NodeHarness, good: np.ndarray
) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node, pub = harness.node, harness.pubs['image']
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert wait_until(lambda: pub.get_subscription_count() == 0, 10.0)
    inactive = T0_NS + 4000 * 1_000_000_000
    harness.pubs['image'].publish(camera_msg(good, inactive))
    assert harness.wait_for_pose(inactive, 2.0) is None
    closed = []

    class TreeDouble:  # tf2's listener (tf2_ros cannot be installed here)
        def close(self) -> None:
            closed.append(True)

    node._tf_tree = TreeDouble()  # cleanup drops the /tf listener the node made
    configured_map = node.get_parameter('map_path').value
    node.set_parameters([Parameter('map_path', value='/maps/next')])  # for the next configure
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert closed == [True] and node._offsets is None and node._tf_tree is None
    # unconfigured, /diagnostics shows the map the next configure reads (set while configured),
    # not the last configure's
    node.publish_diagnostics()
    shown = harness.wait_for(
        '/diagnostics',
        lambda m: any(
            kv.key == 'map_path' and kv.value == '/maps/next' for kv in m.status[0].values
        ),
        5.0,
    )
    assert shown is not None
    node.set_parameters([Parameter('map_path', value=configured_map)])
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    assert wait_until(lambda: pub.get_subscription_count() > 0, 10.0)
    assert localise_good_frame(harness, good, inactive + 1_000_000_000) is not None


def test_a_bad_start_up_parameter_exits_with_its_one_line_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from vlm_vpr.ros.node import main

    assert main(['vpr_node', '--ros-args', '-p', 'mode:=foo']) == 1
    out, err = capfd.readouterr()
    assert 'vpr_node: error: mode must be one of' in out
    assert 'Traceback' not in err


def test_relocalize_answers_with_frames_taken_after_the_call_only(
    harness: NodeHarness, good: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame the worker was localising when the call came neither answers it nor passes the
    re-armed /initialpose gate."""
    node, localizer = harness.node, harness.node._localizer
    localize_batch = localizer.localize_batch
    entered, release = threading.Event(), threading.Event()

    def held(images: list[np.ndarray], *args: Any) -> Any:
        entered.set()
        release.wait(30.0)
        return localize_batch(images, *args)

    live = {
        'relocalize_frames': 1,
        'initial_pose.enabled': True,
        'initial_pose.consecutive_frames': 1,
        'confidence.initial_pose_threshold': 0.01,
    }
    defaults = {name: node.get_parameter(name).value for name in live}
    node.set_parameters([Parameter(k, value=v) for k, v in live.items()])
    try:
        shut = T0_NS + 6000 * 1_000_000_000  # passes the gate, which shuts
        assert localise_good_frame(harness, good, shut) is not None
        assert harness.wait_for('initialpose', lambda m: stamp_ns(m.header) == shut, 10.0)
        monkeypatch.setattr(localizer, 'localize_batch', held)
        taken = shut + 1_000_000_000
        time.sleep(1.0 / MAX_RATE_HZ)
        harness.pubs['image'].publish(camera_msg(good, taken))
        assert entered.wait(30.0)  # the worker took the frame and is localising it
        pending = harness.call_in_background(Trigger, 'relocalize')
        assert wait_until(lambda: bool(node._waiters), 30.0)
        release.set()
        assert harness.wait_for_pose(taken) is not None
        later = taken + 1_000_000_000
        assert localise_good_frame(harness, good, later) is not None
        assert json.loads(pending.result(timeout=30.0).message)['stamp_ns'] == later
        gated = [stamp_ns(m.header) for m in harness.messages('initialpose')]
        assert gated[gated.index(shut) + 1 :] == [later]
    finally:
        release.set()
        node.set_parameters([Parameter(k, value=v) for k, v in defaults.items()])


def test_a_new_max_rate_hz_applies_to_the_waiting_frame(
    harness: NodeHarness, good: np.ndarray
) -> None:
    node = harness.node
    stamp = T0_NS + 6100 * 1_000_000_000
    assert localise_good_frame(harness, good, stamp) is not None
    node.set_parameters([Parameter('max_rate_hz', value=0.01)])  # one batch per 100 s
    try:
        harness.pubs['image'].publish(camera_msg(good, stamp + 1))
        assert harness.wait_for_pose(stamp + 1, 2.0) is None
        node.set_parameters([Parameter('max_rate_hz', value=MAX_RATE_HZ)])
        assert harness.wait_for_pose(stamp + 1, 10.0)
    finally:
        node.set_parameters([Parameter('max_rate_hz', value=MAX_RATE_HZ)])


def test_relocalize_calls_at_once_take_turns_and_leave_the_node_running(
    harness: NodeHarness, good: np.ndarray
) -> None:
    """Each waiting call holds an executor thread; callers retrying faster than it answers
    (a behaviour tree, two operators) held every one, so no frame came to answer them."""
    pending = [harness.call_in_background(Trigger, 'relocalize') for _ in range(4)]
    assert wait_until(lambda: bool(harness.node._waiters), 30.0)
    stamp = T0_NS + 7000 * 1_000_000_000
    for n in range(30):  # 4 calls x relocalize_frames (3) frames, and a margin
        if all(call.done() for call in pending):
            break
        assert localise_good_frame(harness, good, stamp + n * 1_000_000_000) is not None
    responses = [call.result(timeout=30.0) for call in pending]
    assert all(r is not None and r.success for r in responses), responses
    assert len({json.loads(r.message)['stamp_ns'] for r in responses}) == 4  # one after another


def test_deactivating_fails_a_pending_relocalize_at_once(harness: NodeHarness) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = harness.node
    pending = harness.call_in_background(Trigger, 'relocalize')
    try:
        assert wait_until(lambda: bool(node._waiters), 30.0)
        start = time.monotonic()
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        response = pending.result(timeout=10.0)
        assert time.monotonic() - start < 5.0
        assert not response.success
        assert response.message == 'relocalize cancelled: vpr_node was deactivated'
    finally:
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert wait_until(lambda: harness.pubs['image'].get_subscription_count() > 0, 10.0)


def test_shutting_down_answers_a_pending_relocalize_and_the_services_stay(
    campus_map: Path,
) -> None:
    """The services live from start to destruction: a shutdown answers the waiting call (it
    used to destroy the service under it), and later calls get an answer, not silence."""
    from rclpy.lifecycle import TransitionCallbackReturn

    parameters = {'map_path': str(campus_map), 'autostart': True}
    with NodeHarness(parameters, namespace='shutdown_test') as harness:
        node = harness.node
        pending = harness.call_in_background(Trigger, 'relocalize')
        assert wait_until(lambda: bool(node._waiters), 30.0)
        assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
        response = pending.result(timeout=10.0)
        assert response is not None and not response.success
        assert response.message == 'relocalize cancelled: vpr_node was shut down'
        later = harness.call(Trigger, 'relocalize', 10.0)
        assert later is not None and not later.success and 'not active' in later.message
        assert harness.call(Trigger, 'rearm_initial_pose', 10.0).success


@pytest.fixture(scope='module')
def cameras(campus_map: Path) -> NodeHarness:
    """Two cameras (no odometry) whose frames vote in sequences of three."""
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'image_topics': ['image', 'camera2/image'],
        'max_rate_hz': 50.0,
        'sequence.length': 3,
    }
    with NodeHarness(parameters, namespace='cameras_test') as running:
        running.pubs = {t: running.publisher(Image, t) for t in parameters['image_topics']}
        yield running


def localise_on(harness: NodeHarness, topic: str, image: np.ndarray, stamp: int) -> Any:
    harness.pubs[topic].publish(camera_msg(image, stamp))
    return harness.wait_for_pose(stamp)


def test_each_camera_votes_in_a_sequence_of_its_own(
    cameras: NodeHarness, queries: Traversal
) -> None:
    """Front camera along queries 10..12, second camera along 30..31, interleaved."""
    shown = [('image', 10), ('camera2/image', 30), ('image', 11), ('camera2/image', 31)]
    shown.append(('image', 12))
    for n, (topic, i) in enumerate(shown):
        stamp = T0_NS + n * 1_000_000_000
        assert localise_on(cameras, topic, read_image(queries.image_paths[i]), stamp)
    matchers = cameras.node._matchers
    assert {topic: m.count for topic, m in matchers.items()} == {'image': 3, 'camera2/image': 2}


def test_activate_forgets_the_frames_before_the_pause(
    cameras: NodeHarness, queries: Traversal
) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = cameras.node
    assert localise_on(cameras, 'image', read_image(queries.image_paths[13]), T0_NS - 1)
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    assert node._previous_stamp_ns is None
    assert node._camera_stamp_ns == {}
    assert all(m.count == 0 for m in node._matchers.values())


def test_configure_time_parameters_apply_at_the_next_configure_only(
    campus_map: Path, good: np.ndarray
) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    tf, ok = TfLookupDouble(), TransitionCallbackReturn.SUCCESS
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'max_rate_hz': 50.0,
        'use_tf': True,
    }
    with NodeHarness(parameters, tf_lookup=tf, namespace='configure_test') as harness:
        node = harness.node

        def subscribed() -> set[str]:
            return {s.topic_name.removeprefix('/configure_test/') for s in node.subscriptions}

        later = {
            'map_frame': 'elsewhere',
            'camera_frame': 'camera_x',
            'image_topics': ['other'],
            'odom_topic': 'odom',
            'use_camera_info': True,
        }
        results = node.set_parameters([Parameter(k, value=v) for k, v in later.items()])
        assert all(r.successful for r in results)
        assert node.trigger_deactivate() == ok and node.trigger_activate() == ok
        assert subscribed() == {'image'}
        harness.publisher(Image, 'image').publish(camera_msg(good, T0_NS))
        msg = harness.wait_for_pose(T0_NS)
        assert msg is not None and msg.header.frame_id == 'map' and tf.calls[-1][1] == 'camera'

        assert node.trigger_deactivate() == ok and node.trigger_cleanup() == ok
        assert node.trigger_configure() == ok and node.trigger_activate() == ok
        assert subscribed() == {'other', 'camera_info', 'odom'}
        harness.publisher(Image, 'other').publish(camera_msg(good, T0_NS + 1))
        msg = harness.wait_for_pose(T0_NS + 1)
        assert msg is not None and msg.header.frame_id == 'elsewhere'
        assert tf.calls[-1][1] == 'camera_x'


def test_two_cameras_look_each_stamp_up_once_for_the_gate_and_the_vote(
    campus_map: Path, good: np.ndarray
) -> None:
    """The gate's motion (since the other camera's frame) and the vote's (since this camera's
    last frame) share the lookup at this frame's stamp: three TF lookups, not four."""
    stamps = [T0_NS + n * 1_000_000_000 for n in range(3)]
    tf = TfLookupDouble()
    tf.transforms[('odom', 'base_link')] = {
        s: (float(n), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0) for n, s in enumerate(stamps)
    }
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'image_topics': ['image', 'camera2/image'],
        'odom_frame': 'odom',
        'initial_pose.enabled': True,
        'max_rate_hz': 50.0,
        'sequence.length': 2,
    }
    with NodeHarness(parameters, tf_lookup=tf, namespace='lookups_test') as harness:
        pubs = {t: harness.publisher(Image, t) for t in parameters['image_topics']}
        for stamp, topic in zip(stamps, ['image', 'camera2/image', 'image']):
            pubs[topic].publish(camera_msg(good, stamp))
            assert harness.wait_for_pose(stamp)
        assert harness.node.counts().get('motion_unknown', 0) == 0
    looked_up = [stamp for target, _, stamp in tf.calls if target == 'odom']
    # frame 1: nothing to move from; frame 2: the gate (since 1); frame 3: gate (since 2), vote
    # (since 1)
    assert sorted(looked_up) == sorted([stamps[0], stamps[1], *stamps])


def test_a_shut_initial_pose_gate_looks_no_motion_up(campus_map: Path, good: np.ndarray) -> None:
    """Once /initialpose is published the gate is shut until re-armed: the frames after it
    need no motion, and with tf2 each lookup may wait TF_WAIT_S."""
    stamps = [T0_NS + n * 1_000_000_000 for n in range(4)]
    tf = TfLookupDouble()
    tf.transforms[('odom', 'base_link')] = dict.fromkeys(stamps, IDENTITY)  # standing still
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'odom_frame': 'odom',
        'initial_pose.enabled': True,
        'initial_pose.consecutive_frames': 2,
        'confidence.initial_pose_threshold': 0.01,
        'max_rate_hz': 50.0,
    }
    with NodeHarness(parameters, tf_lookup=tf, namespace='shut_gate_test') as harness:
        pub = harness.publisher(Image, 'image')
        for stamp in stamps:
            pub.publish(camera_msg(good, stamp))
            assert harness.wait_for_pose(stamp)
        assert [stamp_ns(m.header) for m in harness.messages('initialpose')] == [stamps[1]]
    looked_up = [stamp for target, _, stamp in tf.calls if target == 'odom']
    assert sorted(looked_up) == stamps[:2]  # the second frame's gate motion, then none
