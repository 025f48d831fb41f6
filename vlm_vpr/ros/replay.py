"""Publish a bag's messages on the live ROS graph with their recorded timing.

For machines without ``ros2 bag play`` (only the pip-installed rclpy wheels): the bag is read
with rosbags (:func:`vlm_vpr.core.bags.iter_bag_messages`) and each message's CDR bytes are
published unchanged through an rclpy publisher of its type.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from vlm_vpr.core.bags import TF_STATIC_TOPIC, iter_bag_messages, list_topics
from vlm_vpr.core.errors import BagError

log = logging.getLogger(__name__)


def message_class(msgtype: str) -> Any:
    """The rclpy message class of ``'pkg/msg/Name'``; BagError if its package is missing."""
    package, _, name = msgtype.rpartition('/')
    try:
        return getattr(importlib.import_module(package.replace('/', '.')), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BagError(
            f'message type {msgtype} is not installed ({exc}); install its ROS '
            'package (or PyPI wheel) or leave the topic out with --topics'
        ) from exc


def replay_bag(
    bag_path: str | Path,
    *,
    rate: float = 1.0,
    topics: Sequence[str] | None = None,
    start_delay_s: float = 1.0,
    context: Any = None,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Publish the bag's messages (all topics, or ``topics``) at ``rate`` x recorded speed.

    Topics whose message type is not installed are skipped with a warning (e.g. /tf where
    tf2_msgs is missing), unless named in ``topics`` or none is left (then BagError).
    ``start_delay_s`` leaves time for subscribers to connect. Uses ``context`` (a initialised
    rclpy Context) or an own one. Returns ``{topic: messages published}``. ``stop`` ends the
    replay early.
    """
    if not rate > 0:
        raise BagError(f'--rate must be > 0, got {rate}')
    if not start_delay_s >= 0:
        raise BagError(f'--start-delay-s must be >= 0, got {start_delay_s}')
    available = list_topics(bag_path)
    chosen = list(topics) if topics else sorted(available)
    missing = [t for t in chosen if t not in available]
    if missing:
        raise BagError(f'topics {missing} are not in {bag_path}; available: {sorted(available)}')
    classes: dict[str, Any] = {}
    for topic in chosen:
        try:
            classes[topic] = message_class(available[topic])
        except BagError as exc:
            if topics:
                raise
            log.warning('skipping %s: %s', topic, exc)
    if not classes:
        types = ', '.join(f'{t} [{available[t]}]' for t in chosen) or 'none'
        raise BagError(
            f'no topic of {bag_path} can be replayed: no message type of its topics is '
            f'installed ({types}); install their ROS packages (or PyPI wheels)'
        )
    own_context = context is None
    if own_context:
        context = rclpy.Context()
        rclpy.init(context=context)
    node = rclpy.create_node('vpr_replay', context=context)
    try:
        publishers = {t: node.create_publisher(cls, t, _qos(t)) for t, cls in classes.items()}
        time.sleep(start_delay_s)
        return _play(bag_path, publishers, rate, stop or threading.Event())
    finally:
        node.destroy_node()
        if own_context:
            rclpy.try_shutdown(context=context)
            context.destroy()


def _play(
    bag_path: str | Path, publishers: dict[str, Any], rate: float, stop: threading.Event
) -> dict[str, int]:
    sent: Counter[str] = Counter()
    first_ns: int | None = None
    start = time.monotonic()
    for topic, _, bag_ns, raw in iter_bag_messages(bag_path, list(publishers)):
        first_ns = bag_ns if first_ns is None else first_ns
        delay = start + (bag_ns - first_ns) / 1e9 / rate - time.monotonic()
        if stop.wait(max(0.0, delay)):
            break
        publishers[topic].publish(raw)
        sent[topic] += 1
    log.info('replayed %s: %s', bag_path, dict(sent))
    return dict(sent)


def _qos(topic: str) -> QoSProfile:
    """Reliable depth 10 (matches reliable and best-effort subscribers); /tf_static latched,
    keeping every message (each may hold different transforms) for late subscribers."""
    if topic == TF_STATIC_TOPIC:
        return QoSProfile(
            history=HistoryPolicy.KEEP_ALL,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
    return QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
