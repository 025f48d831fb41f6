"""Run the node in this process with a listener that records its outputs.

Used by the demo, the benchmark and the tests: a real VprNode on its own ROS context, spun by a
MultiThreadedExecutor in a background thread, talking over the real middleware (loopback).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float32, Header
from visualization_msgs.msg import MarkerArray

from vlm_vpr.core.types import Pose
from vlm_vpr.ros.conversions import image_msg, pose_msg, stamp_ns
from vlm_vpr.ros.node import VprNode
from vlm_vpr.ros.tf_adapter import Lookup

OUTPUTS = {
    'pose': PoseWithCovarianceStamped,
    'confidence': Float32,
    'candidates': PoseArray,
    'candidate_markers': MarkerArray,
    'initialpose': PoseWithCovarianceStamped,
    '/diagnostics': DiagnosticArray,
    'debug_image': Image,
}


class NodeHarness:
    """``with NodeHarness({'map_path': ..., 'autostart': True}) as h:`` runs a VprNode;
    ``h.received[topic]`` lists the messages the listener got on each of OUTPUTS. Harnesses
    running at once need distinct ``namespace`` values (relative topics live under it)."""

    def __init__(
        self,
        parameters: dict[str, Any],
        tf_lookup: Lookup | None = None,
        namespace: str = '',
    ) -> None:
        self.parameters = parameters
        self.namespace = namespace
        self.tf_lookup = tf_lookup
        self.received: dict[str, list[Any]] = {topic: [] for topic in OUTPUTS}
        self._lock = threading.Lock()

    def __enter__(self) -> NodeHarness:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter(k, value=v) for k, v in self.parameters.items()]
        self.node = VprNode(
            context=self.context,
            parameter_overrides=overrides,
            tf_lookup=self.tf_lookup,
            namespace=self.namespace,
        )
        self.listener = rclpy.create_node(
            'vpr_listener', context=self.context, namespace=self.namespace
        )
        for topic, msg_type in OUTPUTS.items():
            self.listener.create_subscription(
                msg_type, topic, lambda msg, t=topic: self._record(t, msg), 50
            )
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.listener)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # rclpy's Executor.shutdown destroys its guard condition before the callbacks in flight
        # have triggered it (ros2/rclpy#968): take the nodes off first so that no new callback
        # starts, and give the running ones (they never block) a moment to finish
        for node in (self.node, self.listener):
            self.executor.remove_node(node)
        time.sleep(0.2)
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        self.listener.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.context.destroy()  # now, not in a later garbage collection

    def _record(self, topic: str, msg: Any) -> None:
        with self._lock:
            self.received[topic].append(msg)

    def messages(self, topic: str) -> list[Any]:
        with self._lock:
            return list(self.received[topic])

    def publisher(self, msg_type: Any, topic: str, timeout_s: float = 10.0) -> Any:
        """A publisher on the listener node, returned once the node has subscribed to it."""
        pub = self.listener.create_publisher(msg_type, topic, 10)
        wait_until(lambda: pub.get_subscription_count() > 0, timeout_s)
        return pub

    def wait_for(
        self, topic: str, predicate: Callable[[Any], bool], timeout_s: float = 20.0
    ) -> Any | None:
        """The first message on ``topic`` matching ``predicate``, or None after the timeout."""
        found: list[Any] = []

        def check() -> bool:
            found[:] = [m for m in self.messages(topic) if predicate(m)][:1]
            return bool(found)

        wait_until(check, timeout_s)
        return found[0] if found else None

    def wait_for_pose(self, stamp: int, timeout_s: float = 30.0) -> Any | None:
        """The ``pose`` message of the frame stamped ``stamp`` (ns), or None after the timeout."""
        return self.wait_for('pose', lambda m: stamp_ns(m.header) == stamp, timeout_s)

    def call(
        self, srv_type: Any, name: str, timeout_s: float = 30.0, request: Any = None
    ) -> Any | None:
        """Call a service of the node over the graph (``request``: an empty one if None); the
        response, or None after the timeout."""
        client: Any = self.listener.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout_s):
                return None
            future = client.call_async(srv_type.Request() if request is None else request)
            wait_until(future.done, timeout_s)
            return future.result() if future.done() else None
        finally:
            self.listener.destroy_client(client)

    def call_in_background(self, srv_type: Any, name: str, timeout_s: float = 30.0) -> Future:
        """:meth:`call` on a thread of its own, for a service that answers only after later
        frames (``relocalize``); the future's result is the response or None."""
        executor = ThreadPoolExecutor(max_workers=1)
        try:
            return executor.submit(self.call, srv_type, name, timeout_s)
        finally:
            executor.shutdown(wait=False)


def header_at(stamp_ns: int, frame_id: str) -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return header


def camera_msg(
    image_bgr: np.ndarray, stamp_ns: int, compressed: bool = False, frame_id: str = 'camera'
) -> Any:
    """An Image ('bgr8') or CompressedImage (JPEG) of [H x W x 3] uint8 BGR ``image_bgr``."""
    import cv2

    header = header_at(stamp_ns, frame_id)
    if not compressed:
        return image_msg(image_bgr, header)
    ok, data = cv2.imencode('.jpg', image_bgr)
    return CompressedImage(header=header, format='jpeg', data=data.tobytes())


def odometry_msg(
    pose: Pose, stamp_ns: int, frame_id: str = 'odom', child_frame_id: str = 'base_link'
) -> Odometry:
    msg = Odometry(header=header_at(stamp_ns, frame_id), child_frame_id=child_frame_id)
    msg.pose.pose = pose_msg(pose)
    return msg


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
