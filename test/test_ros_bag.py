"""End to end on a bag: the campus_loop query traversal written to an .mcap bag, replayed by
`vlm-vpr replay` into the `vpr_node` console script (both subprocesses), outputs checked by a
listener; plus the replay module's error paths."""

from __future__ import annotations

import importlib.util
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from vlm_vpr.core.bags import BagWriter, write_traversal_bag
from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.errors import BagError
from vlm_vpr.core.types import Pose
from vlm_vpr.ros.conversions import stamp_ns
from vlm_vpr.ros.harness import wait_until
from vlm_vpr.ros.replay import replay_bag

IMAGE_TOPIC = '/camera/image_raw/compressed'
BIN = Path(sys.executable).parent
# a name of its own: nodes of earlier tests in this process may linger in the DDS graph
NODE_NAME = 'vpr_node_under_test'
T0_NS = 1_700_000_000_000_000_000  # write_traversal_bag's first stamp
RATE_HZ = 2.0


@pytest.fixture(scope='module')
def queries(data_root: Path) -> Traversal:
    return read_traversal(data_root / 'campus_loop' / 'query')


@pytest.fixture(scope='module')
def query_bag(queries: Traversal, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_traversal_bag(
        queries,
        tmp_path_factory.mktemp('bags') / 'campus_query',
        image_topic=IMAGE_TOPIC,
        compressed=True,
        odom_topic='/odom',
        rate_hz=RATE_HZ,
    )


class Listener:
    """A node of its own context recording /pose and /diagnostics."""

    def __init__(self) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('bag_test_listener', context=self.context)
        self.poses: list[Any] = []
        self.diagnostics: list[Any] = []
        self.node.create_subscription(PoseWithCovarianceStamped, '/pose', self.poses.append, 50)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self.diagnostics.append, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.context.destroy()


@pytest.fixture
def listener() -> Iterator[Listener]:
    running = Listener()
    yield running
    running.close()


def test_console_script_node_localises_a_replayed_query_bag(
    campus_map: Path, query_bag: Path, queries: Traversal, listener: Listener, tmp_path: Path
) -> None:
    log = (tmp_path / 'node.log').open('w')
    node = subprocess.Popen(
        [
            str(BIN / 'vpr_node'),
            '--ros-args',
            '-r',
            f'__node:={NODE_NAME}',
            '-p',
            'autostart:=true',
            '-p',
            f'map_path:={campus_map}',
            '-p',
            f'image_topics:=[{IMAGE_TOPIC}]',
            '-p',
            'odom_topic:=/odom',
            '-p',
            'max_rate_hz:=20.0',
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        contract = {'/pose', '/confidence', '/candidates', '/diagnostics'}

        def published_by_node() -> set[str]:
            if NODE_NAME not in listener.node.get_node_names():
                return set()
            names = listener.node.get_publisher_names_and_types_by_node(NODE_NAME, '/')
            return {name for name, _ in names}

        assert wait_until(
            lambda: (
                contract <= published_by_node()
                and listener.node.count_subscribers(IMAGE_TOPIC) > 0
            ),
            60.0,
        ), (tmp_path / 'node.log').read_text()
        replay = subprocess.run(
            [
                str(BIN / 'vlm-vpr'),
                'replay',
                str(query_bag),
                '--rate',
                '1.0',
                '--topics',
                IMAGE_TOPIC,
                '/odom',
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        assert f'"{IMAGE_TOPIC}": {len(queries)}' in replay.stdout
        last = T0_NS + round((len(queries) - 1) * 1e9 / RATE_HZ)
        wait_until(lambda: any(stamp_ns(p.header) == last for p in listener.poses), 20.0)
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=30) == 0, (tmp_path / 'node.log').read_text()
    finally:
        if node.poll() is None:
            node.kill()
        log.close()
    poses = list(listener.poses)
    assert len(poses) >= len(queries) // 2, f'only {len(poses)} of {len(queries)} localised'
    errors = []
    for msg in poses:
        index = (stamp_ns(msg.header) - T0_NS) * RATE_HZ / 1e9
        assert index == round(index), 'a pose stamp that is no image stamp'
        truth = queries.xy[round(index)]
        p = msg.pose.pose.position
        errors.append(math.hypot(p.x - truth[0], p.y - truth[1]))
        cov = np.array(msg.pose.covariance).reshape(6, 6)
        assert msg.header.frame_id == 'map' and np.isfinite(cov).all() and (np.diag(cov) > 0).all()
    assert np.mean(np.array(errors) <= 5.0) >= 0.8, np.round(errors, 1).tolist()
    statuses = [s for d in listener.diagnostics for s in d.status]
    assert any(s.name == f'{NODE_NAME}: localization' for s in statuses)


def test_replay_rejects_topics_missing_from_the_bag_and_a_bad_rate(query_bag: Path) -> None:
    with pytest.raises(BagError, match=r"topics \['/nope'\] are not in"):
        replay_bag(query_bag, topics=['/nope'], start_delay_s=0.0)
    with pytest.raises(BagError, match='--rate must be > 0'):
        replay_bag(query_bag, rate=0.0)


def test_replay_cli_reports_a_missing_topic_and_exits_1(query_bag: Path, capsys) -> None:
    from vlm_vpr.cli import main

    assert main(['replay', str(query_bag), '--topics', '/nope', '--start-delay-s', '0']) == 1
    assert "topics ['/nope'] are not in" in capsys.readouterr().err


def test_replay_skips_topics_whose_message_type_is_not_installed(tmp_path: Path) -> None:
    bag = tmp_path / 'tf_bag'
    with BagWriter(bag) as writer:
        writer.write_pose('/truth', T0_NS, Pose(1.0, 2.0))
        writer.write_transforms(T0_NS, [('map', 'base_link', Pose(1.0, 2.0))])
    if importlib.util.find_spec('tf2_msgs') is not None:
        assert replay_bag(bag, start_delay_s=0.0) == {'/truth': 1, '/tf': 1}
        return
    assert replay_bag(bag, start_delay_s=0.0) == {'/truth': 1}  # /tf left out, with a warning
    with pytest.raises(BagError, match='tf2_msgs/msg/TFMessage is not installed'):
        replay_bag(bag, topics=['/tf'], start_delay_s=0.0)


def test_replay_refuses_a_bag_without_an_installed_message_type(tmp_path: Path) -> None:
    from rosbags.typesys import get_types_from_msg

    bag = tmp_path / 'unknown_bag'
    with BagWriter(bag) as writer:
        store = writer._typestore
        store.register(get_types_from_msg('int32 x', 'vpr_test_msgs/msg/Unknown'))
        writer._write('/unknown', T0_NS, store.types['vpr_test_msgs/msg/Unknown'](1))
    with pytest.raises(
        BagError,
        match=r'no topic .* can be replayed: .* \(/unknown \[vpr_test_msgs/msg/Unknown\]\)',
    ):
        replay_bag(bag, start_delay_s=0.0)


def test_replay_latches_every_tf_static_message_for_a_late_subscriber(tmp_path: Path) -> None:
    # PoseStamped stands in for tf2_msgs/TFMessage (maybe not installed): the latched QoS
    # belongs to the topic name
    bag = tmp_path / 'static_bag'
    with BagWriter(bag) as writer:
        for i, child in enumerate(['camera', 'lidar', 'imu']):
            writer.write_pose('/tf_static', T0_NS + i, Pose(0.0, 0.0), frame_id=child)
        writer.write_pose('/later', T0_NS + 30 * 10**9, Pose(0.0, 0.0))
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('late_subscriber', context=context)
    stop = threading.Event()
    replay = threading.Thread(
        target=replay_bag, args=(bag,), kwargs={'context': context, 'stop': stop}
    )
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    qos = QoSProfile(
        depth=10,
        reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL,
    )
    early: list[str] = []  # once it holds all three, they have been published
    late: list[str] = []  # subscribed after that: gets them only if the publisher keeps them

    def spin_until_three(got: list[str]) -> None:
        deadline = time.monotonic() + 10.0
        while len(got) < 3 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)

    try:
        replay.start()
        node.create_subscription(
            PoseStamped, '/tf_static', lambda m: early.append(m.header.frame_id), qos
        )
        spin_until_three(early)
        node.create_subscription(
            PoseStamped, '/tf_static', lambda m: late.append(m.header.frame_id), qos
        )
        spin_until_three(late)
    finally:
        stop.set()
        replay.join(timeout=10.0)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        context.destroy()
    assert early == ['camera', 'lidar', 'imu']
    assert late == ['camera', 'lidar', 'imu']


def test_replay_keeps_the_recorded_timing(query_bag: Path) -> None:
    start = time.monotonic()
    sent = replay_bag(query_bag, rate=10.0, topics=['/odom'], start_delay_s=0.0)
    elapsed = time.monotonic() - start
    assert sent == {'/odom': 36}
    span_s = 35 / RATE_HZ / 10.0  # 36 messages 0.5 s apart, ten times faster
    assert span_s * 0.9 <= elapsed <= span_s + 3.0
