"""Run the node in this process with a listener that records its outputs.

Used by the demo, the benchmark and the tests: a real VprNode on its own ROS context, spun by a
MultiThreadedExecutor in a background thread, talking over the real middleware (loopback).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from std_msgs.msg import Float32
from visualization_msgs.msg import MarkerArray

from vlm_vpr.ros.node import VprNode
from vlm_vpr.ros.tf_offset import OffsetSource

OUTPUTS = {
    'pose': PoseWithCovarianceStamped,
    'confidence': Float32,
    'candidates': PoseArray,
    'candidate_markers': MarkerArray,
    '/initialpose': PoseWithCovarianceStamped,
    '/diagnostics': DiagnosticArray,
}


class NodeHarness:
    """``with NodeHarness({'map_path': ..., 'autostart': True}) as h:`` runs a VprNode;
    ``h.received[topic]`` lists the messages the listener got on each of OUTPUTS."""

    def __init__(self, parameters: dict[str, Any],
                 offset_source: OffsetSource | None = None) -> None:
        self.parameters = parameters
        self.offset_source = offset_source
        self.received: dict[str, list[Any]] = {topic: [] for topic in OUTPUTS}
        self._lock = threading.Lock()

    def __enter__(self) -> NodeHarness:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter(k, value=v) for k, v in self.parameters.items()]
        self.node = VprNode(context=self.context, parameter_overrides=overrides,
                            offset_source=self.offset_source)
        self.listener = rclpy.create_node('vpr_listener', context=self.context)
        for topic, msg_type in OUTPUTS.items():
            self.listener.create_subscription(msg_type, topic,
                                              lambda msg, t=topic: self._record(t, msg), 50)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.listener)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        self.listener.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)

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

    def wait_for(self, topic: str, predicate: Callable[[Any], bool],
                 timeout_s: float = 20.0) -> Any | None:
        """The first message on ``topic`` matching ``predicate``, or None after the timeout."""
        found: list[Any] = []

        def check() -> bool:
            found[:] = [m for m in self.messages(topic) if predicate(m)][:1]
            return bool(found)

        wait_until(check, timeout_s)
        return found[0] if found else None

    def call(self, srv_type: Any, name: str, timeout_s: float = 30.0) -> Any | None:
        """Call a service of the node; the response, or None after the timeout."""
        client = self.listener.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout_s):
                return None
            future = client.call_async(srv_type.Request())
            wait_until(future.done, timeout_s)
            return future.result() if future.done() else None
        finally:
            self.listener.destroy_client(client)


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
