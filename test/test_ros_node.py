"""The running node over real rclpy: the campus_loop queries in (as Image and CompressedImage,
with odometry), poses out; /initialpose gating; the relocalize and rearm services."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.images import read_image
from vlm_vpr.core.types import Pose
from vlm_vpr.ros.conversions import image_from_msg, pose_msg, stamp_ns
from vlm_vpr.ros.harness import NodeHarness, camera_msg, odometry_msg, wait_until

T0_NS = 1_700_000_000_000_000_000
PERIOD_NS = 1_000_000_000
GATE_FRAMES, GATE_DISTANCE_M, GATE_YAW_DEG, GATE_CONFIDENCE = 3, 3.0, 30.0, 0.3
COMPRESSED_TOPIC = 'camera2/image/compressed'


@dataclass
class Stream:
    """What the node published for each query frame i (sent at T0 + i s)."""

    poses: list[Any]
    confidences: list[float]
    candidates: list[Any]
    initial_poses: list[Any]


@pytest.fixture(scope='module')
def queries(data_root: Path) -> Traversal:
    return read_traversal(data_root / 'campus_loop' / 'query')


@pytest.fixture(scope='module')
def harness(campus_map: Path) -> NodeHarness:
    parameters = {
        'map_path': str(campus_map),
        'autostart': True,
        'image_topics': ['image', COMPRESSED_TOPIC],
        'odom_topic': 'odom',
        'max_rate_hz': 50.0,
        'initial_pose.enabled': True,
        'initial_pose.consecutive_frames': GATE_FRAMES,
        'initial_pose.max_distance_m': GATE_DISTANCE_M,
        'initial_pose.max_yaw_deg': GATE_YAW_DEG,
        'confidence.initial_pose_threshold': GATE_CONFIDENCE,
    }
    with NodeHarness(parameters) as running:
        running.pubs = {
            'image': running.publisher(Image, 'image'),
            'compressed': running.publisher(CompressedImage, COMPRESSED_TOPIC),
            'odom': running.publisher(Odometry, 'odom'),
        }
        yield running


def send(harness: NodeHarness, queries: Traversal, i: int, stamp: int) -> Any:
    """Publish odometry (the true pose) and query image i (even: Image, odd: CompressedImage)
    at ``stamp``; return the pose the node publishes for it (None after a timeout)."""
    odometry = harness.node.counts().get('odometry', 0)
    harness.pubs['odom'].publish(odometry_msg(queries.pose(i), stamp))
    assert wait_until(lambda: harness.node.counts().get('odometry', 0) > odometry, 10.0)
    compressed = i % 2 == 1
    harness.pubs['compressed' if compressed else 'image'].publish(
        camera_msg(read_image(queries.image_paths[i]), stamp, compressed)
    )
    return harness.wait_for_pose(stamp)


@pytest.fixture(scope='module')
def stream(harness: NodeHarness, queries: Traversal) -> Stream:
    poses = [send(harness, queries, i, T0_NS + i * PERIOD_NS) for i in range(len(queries))]
    sent = sum(p is not None for p in poses)  # each pose is followed by these two messages
    wait_until(
        lambda: min(len(harness.messages(t)) for t in ('confidence', 'candidates')) >= sent, 10.0
    )
    return Stream(
        poses,
        [m.data for m in harness.messages('confidence')],
        harness.messages('candidates'),
        harness.messages('initialpose'),
    )


def check_covariance(msg: Any) -> None:
    cov = np.array(msg.pose.covariance).reshape(6, 6)
    assert np.isfinite(cov).all() and (np.diag(cov) > 0).all() and np.allclose(cov, cov.T)
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    assert all(math.isfinite(v) for v in (p.x, p.y, p.z, q.x, q.y, q.z, q.w))


def xy_yaw(msg: Any) -> tuple[float, float, float]:
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    return p.x, p.y, math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y * q.y + q.z * q.z))


def test_node_localises_the_queries_sent_as_image_and_compressed_image(
    stream: Stream, queries: Traversal
) -> None:
    assert all(p is not None for p in stream.poses), 'a frame got no pose within 30 s'
    errors = np.array(
        [
            math.hypot(
                p.pose.pose.position.x - queries.xy[i, 0],
                p.pose.pose.position.y - queries.xy[i, 1],
            )
            for i, p in enumerate(stream.poses)
        ]
    )
    assert np.mean(errors <= 5.0) >= 0.8, f'errors (m): {np.round(errors, 1).tolist()}'
    for transport in (0, 1):  # Image (even frames) and CompressedImage (odd) both localise
        assert np.mean(errors[transport::2] <= 5.0) >= 0.7
    assert all(p.header.frame_id == 'map' for p in stream.poses)


def test_pose_is_stamped_with_the_image_stamp_and_has_a_valid_covariance(stream: Stream) -> None:
    for i, msg in enumerate(stream.poses):
        assert stamp_ns(msg.header) == T0_NS + i * PERIOD_NS
        check_covariance(msg)
    assert len(stream.confidences) == len(stream.poses)
    assert all(0.0 <= c <= 1.0 for c in stream.confidences)


def pose_values(msg: Any) -> list[float]:
    p, q = msg.position, msg.orientation
    return [p.x, p.y, p.z, q.x, q.y, q.z, q.w]


def test_candidates_are_the_top_k_map_poses_in_the_map_frame(
    stream: Stream, harness: NodeHarness, queries: Traversal
) -> None:
    assert [stamp_ns(c.header) for c in stream.candidates] == [
        stamp_ns(p.header) for p in stream.poses
    ]
    assert all(c.header.frame_id == 'map' and len(c.poses) == 10 for c in stream.candidates)
    # each frame's candidates: the map poses of its top 10 (the node's localizer on the image
    # it received; no camera offset, so the base is where the camera is)
    localizer = harness.node._localizer
    for i, msg in enumerate(stream.candidates):
        image = image_from_msg(camera_msg(read_image(queries.image_paths[i]), 0, i % 2 == 1))
        top = [c.map_index for c in localizer.localize(image).candidates]
        expected = [pose_msg(localizer.map.content.poses[j]) for j in top]
        assert [pose_values(p) for p in msg.poses] == [
            pytest.approx(pose_values(e), abs=1e-6) for e in expected
        ], f'frame {i}'
    last = stream.candidates[-1]
    found = harness.wait_for(
        'candidate_markers', lambda m: stamp_ns(m.markers[0].header) == stamp_ns(last.header)
    )
    assert found is not None
    markers = found.markers
    assert markers[0].action == markers[0].DELETEALL and len(markers) == 1 + 2 * 10
    arrows = [pose_values(m.pose) for m in markers[1::2]]  # an arrow at each candidate
    assert arrows == [pytest.approx(pose_values(p)) for p in last.poses]


def first_gate_frame(stream: Stream, queries: Traversal) -> int | None:
    """The first frame ending GATE_FRAMES consecutive confident frames whose poses agree
    (each within D m / Y deg of the previous one moved by the true odometry)."""
    run = 0
    for i, msg in enumerate(stream.poses):
        x, y, yaw = xy_yaw(msg)
        agrees = False
        if run and i > 0:
            px, py, pyaw = xy_yaw(stream.poses[i - 1])
            dx, dy = queries.xy[i] - queries.xy[i - 1]
            ty = queries.yaw_rad[i - 1]
            fx, fy = math.cos(ty) * dx + math.sin(ty) * dy, -math.sin(ty) * dx + math.cos(ty) * dy
            ex = px + math.cos(pyaw) * fx - math.sin(pyaw) * fy
            ey = py + math.sin(pyaw) * fx + math.cos(pyaw) * fy
            turn = pyaw + queries.yaw_rad[i] - queries.yaw_rad[i - 1] - yaw
            agrees = (
                math.hypot(x - ex, y - ey) <= GATE_DISTANCE_M
                and abs(math.degrees(math.atan2(math.sin(turn), math.cos(turn)))) <= GATE_YAW_DEG
            )
        if stream.confidences[i] < GATE_CONFIDENCE:
            run = 0
            continue
        run = run + 1 if agrees else 1
        if run == GATE_FRAMES:
            return i
    return None


def test_initialpose_is_published_once_only_after_n_agreeing_confident_frames(
    stream: Stream, queries: Traversal
) -> None:
    k = first_gate_frame(stream, queries)
    assert k is not None, f'no {GATE_FRAMES} agreeing frames: confidences {stream.confidences}'
    print('GATE', k)
    assert len(stream.initial_poses) == 1, 'published again without being re-armed'
    (initial,) = stream.initial_poses
    assert stamp_ns(initial.header) == stamp_ns(stream.poses[k].header)
    assert initial.header.frame_id == 'map'
    assert xy_yaw(initial) == xy_yaw(stream.poses[k])
    check_covariance(initial)


def test_rearm_service_lets_the_gate_publish_once_more(
    harness: NodeHarness, stream: Stream, queries: Traversal
) -> None:
    k = first_gate_frame(stream, queries)
    before = len(harness.messages('initialpose'))
    response = harness.call(Trigger, 'rearm_initial_pose')
    assert response is not None and response.success
    t0 = T0_NS + 100 * PERIOD_NS
    stamps = [t0 + n * PERIOD_NS for n in range(GATE_FRAMES)]
    for n, i in enumerate(range(k - GATE_FRAMES + 1, k + 1)):  # the frames that passed before
        assert send(harness, queries, i, stamps[n]) is not None
    wait_until(lambda: len(harness.messages('initialpose')) > before, 10.0)
    after = harness.messages('initialpose')[before:]
    assert [stamp_ns(m.header) for m in after] == [stamps[-1]]


def relocalize(harness: NodeHarness, queries: Traversal, frames: range, t0: int) -> Any:
    """Call relocalize, then send the query ``frames`` from ``t0`` (1 s apart); its response."""
    pending = harness.call_in_background(Trigger, 'relocalize')
    assert wait_until(lambda: bool(harness.node._waiters), 30.0)  # the next frames answer it
    for n, i in enumerate(frames):
        assert send(harness, queries, i, t0 + n * PERIOD_NS) is not None
    return pending.result(timeout=30.0)


def test_relocalize_service_answers_with_the_result_of_the_next_frames(
    harness: NodeHarness, queries: Traversal
) -> None:
    from rclpy.parameter import Parameter

    t0 = T0_NS + 200 * PERIOD_NS
    response = relocalize(harness, queries, range(10, 13), t0)
    result = json.loads(response.message)
    assert result['frames'] == 3 and result['stamp_ns'] == t0 + 2 * PERIOD_NS
    assert result['confidence_threshold'] == GATE_CONFIDENCE
    assert response.success == (result['confidence'] >= GATE_CONFIDENCE)
    assert math.hypot(result['x'] - queries.xy[12, 0], result['y'] - queries.xy[12, 1]) <= 5.0

    # a threshold above the last frame's confidence (frame 21: about 0.95, the lowest of the
    # queries): answered with the result, but no success
    parameter, threshold = 'confidence.initial_pose_threshold', 0.99
    harness.node.set_parameters([Parameter(parameter, value=threshold)])
    try:
        t0 = T0_NS + 300 * PERIOD_NS
        response = relocalize(harness, queries, range(19, 22), t0)
    finally:
        harness.node.set_parameters([Parameter(parameter, value=GATE_CONFIDENCE)])
    result = json.loads(response.message)
    assert result['frames'] == 3 and result['stamp_ns'] == t0 + 2 * PERIOD_NS
    assert result['confidence_threshold'] == threshold > result['confidence'] >= GATE_CONFIDENCE
    assert not response.success
    assert {'x', 'y', 'yaw_rad', 'best'} <= set(result)


def test_relocalize_without_frames_fails_after_its_timeout(harness: NodeHarness) -> None:
    from rclpy.parameter import Parameter

    harness.node.set_parameters([Parameter('relocalize_timeout_s', value=1.0)])
    start = time.monotonic()
    response = harness.call(Trigger, 'relocalize')
    assert not response.success
    assert 'no frame localised within 1.0 s' in response.message
    assert 0.9 <= time.monotonic() - start < 10.0


def test_odometry_with_nan_is_counted_and_not_stored(harness: NodeHarness) -> None:
    before = harness.node.counts()
    harness.pubs['odom'].publish(odometry_msg(Pose(math.nan, 0.0), T0_NS + 5000 * PERIOD_NS))
    assert wait_until(
        lambda: (
            harness.node.counts().get('odometry_not_finite', 0)
            == before.get('odometry_not_finite', 0) + 1
        ),
        10.0,
    )
    assert harness.node.counts().get('odometry', 0) == before.get('odometry', 0)


def test_diagnostics_report_counts_latency_and_map_size(harness: NodeHarness) -> None:
    harness.node.publish_diagnostics()
    msg = harness.wait_for(
        '/diagnostics',
        lambda m: any(kv.key == 'localized' and int(kv.value) >= 36 for kv in m.status[0].values),
        5.0,
    )
    assert msg is not None
    values = {kv.key: kv.value for kv in msg.status[0].values}
    assert values['map_size'] == '36' and msg.status[0].name == 'vpr_node: localization'
    assert values['confidence_calibration'].startswith('default weights')  # an uncalibrated map
    assert float(values['receipt_to_publish_median_ms']) > 0
    assert float(values['latency_extract_ms']) > 0
    latency = harness.node.latency_stats()
    assert latency['count'] >= 36 and latency['p95_ms'] >= latency['median_ms'] > 0


def test_lifecycle_and_parameter_services_answer_over_the_graph(campus_map: Path) -> None:
    """What `ros2 lifecycle set` and `ros2 param set` do: another node calls the services."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.msg import ParameterType, ParameterValue
    from rcl_interfaces.srv import GetParameters, SetParameters

    def state(harness: NodeHarness) -> str:
        return harness.call(GetState, 'vpr_node/get_state', 10.0).current_state.label

    def change(harness: NodeHarness, transition: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition))
        return harness.call(ChangeState, 'vpr_node/change_state', 30.0, request).success

    def set_parameter(harness: NodeHarness, name: str, value: ParameterValue) -> Any:
        request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=value)])
        return harness.call(SetParameters, 'vpr_node/set_parameters', 10.0, request).results[0]

    def set_mode(harness: NodeHarness, mode: str) -> Any:
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=mode)
        return set_parameter(harness, 'mode', value)

    with NodeHarness({'map_path': str(campus_map)}, namespace='graph_test') as harness:
        assert state(harness) == 'unconfigured'  # no autostart: a lifecycle manager drives it
        assert change(harness, Transition.TRANSITION_CONFIGURE)
        assert state(harness) == 'inactive'
        assert change(harness, Transition.TRANSITION_ACTIVATE)
        assert state(harness) == 'active'
        refused = set_mode(harness, 'foo')
        assert not refused.successful and 'mode must be one of' in refused.reason
        assert set_mode(harness, 'on_demand').successful
        request = GetParameters.Request(names=['mode'])
        got = harness.call(GetParameters, 'vpr_node/get_parameters', 10.0, request)
        assert got.values[0].string_value == 'on_demand'
        assert harness.node.settings[0].mode == 'on_demand'
        autostart = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=True)
        assert not set_parameter(harness, 'autostart', autostart).successful  # read at start-up
