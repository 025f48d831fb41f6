"""The node in the demo and the benchmark: replay the campus_loop query bag through a running
node and compare what it publishes with the ground truth."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sensor_msgs.msg import Image

from vlm_vpr.core.bags import write_traversal_bag
from vlm_vpr.core.datasets import read_traversal
from vlm_vpr.core.images import read_image
from vlm_vpr.ros.conversions import stamp_ns
from vlm_vpr.ros.harness import NodeHarness, camera_msg, wait_until
from vlm_vpr.ros.replay import replay_bag

IMAGE_TOPIC = '/camera/image_raw'
ODOM_TOPIC = '/odom'
TOLERANCE_M = 5.0  # the campus_loop protocol's tolerance


def run_node_demo(
    map_dir: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    bag_rate_hz: float = 1.0,
    replay_rate: float = 1.0,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write campus_loop/query as a bag (images + odometry), start the node on ``map_dir``
    with ``/initialpose`` enabled, replay the bag into it, print one line per published pose
    (with its position standard deviation and confidence) and a summary.

    Returns the summary (also written to ``out_dir/node_demo.json``): frames sent, poses
    published, fraction within 5 m of the truth, median error, the ``/initialpose``
    publications (frame, error), receipt-to-publish latency and the node's counters.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = read_traversal(Path(data_root) / 'campus_loop' / 'query')
    bag = out_dir / 'campus_loop_query_bag'
    shutil.rmtree(bag, ignore_errors=True)
    write_traversal_bag(
        queries, bag, image_topic=IMAGE_TOPIC, odom_topic=ODOM_TOPIC, rate_hz=bag_rate_hz
    )
    start_ns = 1_700_000_000_000_000_000  # write_traversal_bag's default first stamp
    period_ns = round(1e9 / bag_rate_hz)
    parameters = {
        'map_path': str(map_dir),
        'autostart': True,
        'image_topics': [IMAGE_TOPIC],
        'odom_topic': ODOM_TOPIC,
        'max_rate_hz': 20.0,
        'initial_pose.enabled': True,
    }
    with NodeHarness(parameters) as harness:
        wait_until(lambda: harness.node.count_subscribers(IMAGE_TOPIC) > 0, 10.0)
        sent = replay_bag(bag, rate=replay_rate, context=harness.context)
        last_ns = start_ns + (len(queries) - 1) * period_ns
        harness.wait_for('pose', lambda m: stamp_ns(m.header) >= last_ns, timeout_s=15.0)
        time.sleep(0.5)
        poses = harness.messages('pose')
        confidences = [m.data for m in harness.messages('confidence')]
        initial_poses = harness.messages('initialpose')
        latency = harness.node.latency_stats()
        counts = harness.node.counts()
        node_cfg, query_cfg = harness.node.settings  # for the gate's description

    def frame_and_error(msg: Any) -> tuple[int, float]:
        i = round((stamp_ns(msg.header) - start_ns) / period_ns)
        p = msg.pose.pose.position
        return i, math.hypot(p.x - queries.xy[i, 0], p.y - queries.xy[i, 1])

    if len(confidences) != len(poses):  # each pose is followed by its confidence
        print_fn(f'(confidence column left out: {len(confidences)} for {len(poses)} poses)')
        confidences = [math.nan] * len(poses)
    errors = []
    print_fn(
        f'{"frame":>5} {"image":>14} {"x":>8} {"y":>8} {"true x":>8} {"true y":>8} '
        f'{"error m":>8} {"std m":>6} {"confidence":>10}'
    )
    for msg, confidence in zip(poses, confidences):
        i, error = frame_and_error(msg)
        errors.append(error)
        p = msg.pose.pose.position
        std_m = math.sqrt(max(msg.pose.covariance[0], msg.pose.covariance[7]))  # x, y
        print_fn(
            f'{i:>5} {queries.image_paths[i].name:>14} {p.x:8.2f} {p.y:8.2f} '
            f'{queries.xy[i, 0]:8.2f} {queries.xy[i, 1]:8.2f} {error:8.2f} {std_m:6.2f} '
            f'{confidence:10.3f}'
        )
    published = [frame_and_error(msg) for msg in initial_poses]
    summary: dict[str, Any] = {
        'frames_sent': int(sent.get(IMAGE_TOPIC, 0)),
        'poses_published': len(poses),
        'within_5m': round(float(np.mean(np.array(errors) <= TOLERANCE_M)), 4) if errors else 0.0,
        'median_error_m': round(float(np.median(errors)), 3) if errors else None,
        'initial_pose': [{'frame': i, 'error_m': round(e, 3)} for i, e in published],
        'latency_median_ms': round(latency['median_ms'], 1),
        'latency_p95_ms': round(latency['p95_ms'], 1),
        'node_counts': counts,
    }
    print_fn(
        f'node: {summary["poses_published"]}/{summary["frames_sent"]} frames localised, '
        f'{100 * summary["within_5m"]:.0f}% within {TOLERANCE_M:.0f} m, median error '
        f'{summary["median_error_m"]} m; /initialpose published '
        + (
            ', '.join(f'at frame {i} ({e:.2f} m off)' for i, e in published)
            if published
            else 'never'
        )
        + f' (once, after {node_cfg.initial_pose.consecutive_frames} agreeing frames at '
        f'confidence >= {query_cfg.confidence.initial_pose_threshold:g}; `rearm_initial_pose` '
        're-arms it); latency image->pose median '
        f'{summary["latency_median_ms"]} ms, p95 {summary["latency_p95_ms"]} ms; '
        f'counters {counts}'
    )
    (out_dir / 'node_demo.json').write_text(json.dumps(summary, indent=1) + '\n')
    return summary


def measure_node_latency(
    map_dir: str | Path, data_root: str | Path, num_frames: int = 20
) -> dict[str, float]:
    """Image receipt to pose publish inside the node (median_ms, p95_ms, count), one frame at
    a time (each published after the previous pose, so no frame waits behind another)."""
    queries = read_traversal(Path(data_root) / 'campus_loop' / 'query')
    ids = np.linspace(0, len(queries) - 1, min(num_frames, len(queries))).astype(int)
    with NodeHarness(
        {'map_path': str(map_dir), 'autostart': True, 'max_rate_hz': 100.0}
    ) as harness:
        pub = harness.publisher(Image, 'image')
        for n, i in enumerate(ids):
            stamp = (n + 1) * 1_000_000_000
            pub.publish(camera_msg(read_image(queries.image_paths[i]), stamp))
            harness.wait_for_pose(stamp)
        return harness.node.latency_stats()
