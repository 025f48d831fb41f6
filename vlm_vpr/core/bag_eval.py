"""Offline evaluation on a ROS bag: the node's Localizer over every image of a topic, scored
against ground-truth poses from another topic (``vlm-vpr eval-bag``). No ROS install needed."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np

from vlm_vpr.core.bags import BASE_FRAME, PosedImage, read_pose_track, read_posed_images
from vlm_vpr.core.calibration import fraction, open_set_report
from vlm_vpr.core.confidence import Calibration
from vlm_vpr.core.config import LocalizerConfig
from vlm_vpr.core.errors import BagError, NoFeaturesError
from vlm_vpr.core.evaluation import RECALL_KS, recall_at, within_tolerance
from vlm_vpr.core.initial_pose import InitialPoseConfig, InitialPoseGate
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map
from vlm_vpr.core.sequence import SequenceMatcher
from vlm_vpr.core.types import LocalizationResult, Pose, planar_motion, wrap_angle

log = logging.getLogger(__name__)


def evaluate_bags(
    map_dir: str | Path,
    bag_paths: list[str | Path],
    image_topic: str,
    truth_topic: str,
    config: LocalizerConfig | None = None,
    *,
    tolerance_m: float = 5.0,
    confidence_threshold: float | None = None,
    base_frame: str = BASE_FRAME,
    max_frames: int | None = None,
    initial_pose: InitialPoseConfig | None = None,
    calibration: Calibration | None = None,
    odom_topic: str | None = None,
    odom_frame: str = 'odom',
    progress: bool = True,
) -> dict[str, Any]:
    """Localise every image on ``image_topic`` and compare with the truth on ``truth_topic``.

    The truth (Odometry, PoseStamped, PoseWithCovarianceStamped or /tf down to
    ``base_frame``) is interpolated at each image stamp; images without a truth pose are left
    out. A frame whose true place has no map image within ``tolerance_m`` is out of the map
    (``truth_xy`` None in its row, as in :func:`vlm_vpr.core.evaluation.run_queries`): the
    right answer is to reject it. With ``sequence.length`` > 1 the frames vote in bag order, as
    in the node: by frame order, or with ``odom_topic`` (Odometry, a pose topic, or /tf composed
    from ``odom_frame`` down to ``base_frame``, like the node's ``odom_topic`` / ``odom_frame``)
    by the distance the robot moved between frames (``odometry_step_m`` in the rows).
    ``confidence_threshold`` defaults to ``confidence.initial_pose_threshold``. The node's
    /initialpose gate (``initial_pose``, default :class:`InitialPoseConfig`; consecutive poses
    agree after the odometry's motion, or by distance alone without odometry; re-armed after
    each publication) runs on the frames at that threshold.
    ``calibration``: the confidence model; None: the map's, as the node uses (``vlm-vpr
    calibrate`` passes the defaults: it refits the confidence on the rows).
    Several bags (``vlm-vpr calibrate --bag A --bag B``) share one Localizer (the map, the
    extractor and the re-rankers are loaded once); each runs on its own (the sequence and the
    gate start afresh in each, as after a node restart) and the report pools their frames:
    ``bags`` lists them and each row names its ``bag``.
    Returns the report (see README): ``num_frames``, ``num_in_map``, ``recall``,
    ``position_error_m``, ``yaw_error_deg``, ``success_rate``, ``at_threshold``, ``open_set``,
    ``initial_pose`` and ``initial_pose_gate``, ``timing_ms`` and ``per_query`` (one row per
    frame, with its ``evidence``: ``vlm-vpr calibrate --bag`` fits on them).
    """
    if not tolerance_m > 0:
        raise BagError(f'the tolerance must be > 0 m, got {tolerance_m}')
    if max_frames is not None and max_frames < 1:
        raise BagError(f'--max-frames must be >= 1, got {max_frames}')
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        raise BagError(f'--confidence-threshold must be in [0, 1], got {confidence_threshold}')
    if len({Path(b).resolve() for b in bag_paths}) < len(bag_paths):
        raise BagError('--bag names one bag twice: its frames would count twice')
    vpr_map = read_map(map_dir)
    sources = [  # every bag's topics and poses are checked before the models load
        (
            read_posed_images(
                bag_path,
                image_topic,
                truth_topic,
                map_frame=vpr_map.frame_id,
                base_frame=base_frame,
                min_distance_m=0.0,
                min_rotation_rad=0.0,
                progress=progress,
            ),
            read_pose_track(bag_path, odom_topic, odom_frame, base_frame) if odom_topic else None,
        )
        for bag_path in bag_paths
    ]
    localizer = Localizer(vpr_map, config, calibration)
    config = localizer.config
    threshold = (
        config.confidence.initial_pose_threshold
        if confidence_threshold is None
        else confidence_threshold
    )
    initial_pose = initial_pose or InitialPoseConfig()
    runs = [
        _run_bag(
            localizer,
            frames,
            odom_at,
            image_topic,
            tolerance_m=tolerance_m,
            threshold=threshold,
            max_frames=max_frames,
            initial_pose=initial_pose,
        )
        for frames, odom_at in sources
    ]
    bags: dict[str, str | list[str]]
    if len(bag_paths) == 1:
        bags, per_query = {'bag': str(bag_paths[0])}, runs[0][0]
    else:  # pooled: each row names its bag
        bags = {'bags': [str(b) for b in bag_paths]}
        per_query = [dict(r, bag=str(b)) for b, (rows, _) in zip(bag_paths, runs) for r in rows]
    source = {
        'map': str(map_dir),
        **bags,
        'image_topic': image_topic,
        'truth_topic': truth_topic,
        'odom_topic': odom_topic,
        'frames_without_features': sum(featureless for _, featureless in runs),
        'rerank_chain': list(config.rerank.chain),
        'sequence_length': config.sequence.length,
        'initial_pose_gate': {
            'consecutive_frames': initial_pose.consecutive_frames,
            'max_distance_m': initial_pose.max_distance_m,
            'max_yaw_deg': initial_pose.max_yaw_deg,
        },
    }
    return summarize_bag(per_query, tolerance_m, threshold, source)


def _run_bag(
    localizer: Localizer,
    frames: Generator[PosedImage, None, None],
    odom_at: Callable[[int], Pose | None] | None,
    image_topic: str,
    *,
    tolerance_m: float,
    threshold: float,
    max_frames: int | None,
    initial_pose: InitialPoseConfig,
) -> tuple[list[dict[str, Any]], int]:
    """(the rows of one bag's ``frames``, the number of frames skipped without features);
    ``odom_at``: the robot's odometry pose at a stamp, when the sequence or gate use it."""
    config = localizer.config
    matcher = SequenceMatcher(localizer) if config.sequence.length > 1 else None
    map_xy = localizer.map.positions_xyz[:, :2]
    gate = InitialPoseGate()
    per_query, previous = [], None  # previous: the robot's odometry pose at the last frame
    featureless = 0  # frames skipped as the node skips them (skipped_no_features)
    try:
        for frame in itertools.islice(frames, max_frames):
            try:
                result = localizer.localize(frame.image_bgr)
            except NoFeaturesError as exc:
                log.warning('%s frame at %d ns skipped: %s', image_topic, frame.stamp_ns, exc)
                featureless += 1
                continue
            odom = odom_at(frame.stamp_ns) if odom_at is not None else None
            motion = None if previous is None or odom is None else planar_motion(previous, odom)
            step = math.hypot(motion.x, motion.y) if motion is not None else None
            previous = odom
            if matcher is not None:
                result = matcher.update(result, step)
            published = gate.update(
                result.pose, result.confidence, motion, initial_pose, threshold
            )
            if published:
                gate.rearm()
            row = _frame_row(frame, result, map_xy, tolerance_m, published)
            per_query.append(dict(row, odometry_step_m=step))
    finally:
        frames.close()  # stop reading the bag (max_frames reached, or an error)
    return per_query, featureless


def _frame_row(
    frame: PosedImage,
    result: LocalizationResult,
    map_xy: np.ndarray,
    tolerance_m: float,
    published: bool,
) -> dict[str, Any]:
    """The report row of one bag frame (see :func:`evaluate_bags`)."""
    truth, pose = frame.pose, result.pose
    truth_xy = np.array([truth.x, truth.y])
    candidates_xy = np.array([[c.pose.x, c.pose.y] for c in result.candidates]).reshape(-1, 2)
    hits = list(within_tolerance(candidates_xy, truth_xy, tolerance_m, 'm'))
    yaw_error = None
    if pose.yaw_known and truth.yaw_known:
        yaw_error = abs(math.degrees(wrap_angle(pose.yaw_rad - truth.yaw_rad)))
    in_map = bool(within_tolerance(map_xy, truth_xy, tolerance_m, 'm').any())
    return {
        'name': frame.name,
        'stamp_ns': frame.stamp_ns,
        'truth': [truth.x, truth.y, truth.yaw_rad if truth.yaw_known else None],
        'truth_xy': [truth.x, truth.y] if in_map else None,
        'pose': [pose.x, pose.y, pose.yaw_rad if pose.yaw_known else None],
        'error_m': math.hypot(pose.x - truth.x, pose.y - truth.y),
        'yaw_error_deg': yaw_error,
        'confidence': result.confidence,
        'initial_pose': published,
        'first_correct_rank': hits.index(True) + 1 if any(hits) else None,
        'top_names': [c.image_name for c in result.candidates],
        'evidence': result.evidence,
        'timing_ms': result.timing_ms,
        'notes': result.notes,
    }


def summarize_bag(
    per_query: list[dict[str, Any]], tolerance_m: float, threshold: float, source: dict[str, Any]
) -> dict[str, Any]:
    """The report of :func:`evaluate_bags` from its per-frame rows."""
    n = len(per_query)
    ranks = [f['first_correct_rank'] for f in per_query if f['truth_xy'] is not None]
    errors = np.array([f['error_m'] for f in per_query], dtype=np.float64)
    yaw_errors = np.array(
        [f['yaw_error_deg'] for f in per_query if f['yaw_error_deg'] is not None], dtype=np.float64
    )
    correct = errors <= tolerance_m
    accepted = np.array([f['confidence'] >= threshold for f in per_query], dtype=bool)
    published = [f for f in per_query if f['initial_pose']]
    stages = sorted({s for f in per_query for s in f['timing_ms']})
    return {
        **source,
        'num_frames': n,
        'num_in_map': len(ranks),
        'tolerance_m': tolerance_m,
        'recall': {str(k): recall_at(ranks, k) for k in RECALL_KS},  # frames in the map
        'position_error_m': _spread(errors),
        'yaw_error_deg': _spread(yaw_errors),
        'success_rate': fraction(int(correct.sum()), n),
        'at_threshold': {
            'confidence_threshold': threshold,
            'accepted_rate': fraction(int(accepted.sum()), n),
            'accepted_correct_rate': fraction(int((accepted & correct).sum()), n),
            'wrong_share_of_accepted': fraction(
                int((accepted & ~correct).sum()), int(accepted.sum())
            ),
        },
        'open_set': open_set_report(per_query, threshold),
        'initial_pose': {  # publications of the gate, re-armed after each
            'published': len(published),
            'wrong': sum(f['error_m'] > tolerance_m for f in published),
            'out_of_map': sum(f['truth_xy'] is None for f in published),
        },
        'timing_ms': {
            s: _spread(np.array([f['timing_ms'][s] for f in per_query if s in f['timing_ms']]))
            for s in stages
        },
        'per_query': per_query,
    }


def write_bag_report(
    report: dict[str, Any],
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> None:
    """Write the JSON report and the trajectory plot (each optional)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + '\n')
    if plot_path:
        plot_trajectory(report, plot_path)


def plot_trajectory(report: dict[str, Any], path: str | Path) -> None:
    """PNG: map positions (grey), true trajectory (line), estimates coloured by confidence,
    and a red segment from truth to estimate for every frame off by more than the tolerance."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    map_xy = read_map(report['map'], load_index=False).positions_xyz[:, :2]
    truth = np.array([f['truth'][:2] for f in report['per_query']]).reshape(-1, 2)
    pose = np.array([f['pose'][:2] for f in report['per_query']]).reshape(-1, 2)
    confidence = np.array([f['confidence'] for f in report['per_query']])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(map_xy[:, 0], map_xy[:, 1], s=8, c='0.75', label='map images')
    ax.plot(*truth.T, '-', c='k', lw=1, label='truth')
    for t, p, f in zip(truth, pose, report['per_query']):
        if f['error_m'] > report['tolerance_m']:
            ax.plot([t[0], p[0]], [t[1], p[1]], '-', c='tab:red', lw=0.8)
    points = ax.scatter(
        pose[:, 0],
        pose[:, 1],
        s=16,
        c=confidence,
        cmap='viridis',
        vmin=0,
        vmax=1,
        label='estimates',
        zorder=3,
    )
    fig.colorbar(points, ax=ax, label='confidence', shrink=0.8)
    ax.set_aspect('equal')
    ax.set_title(
        f'{Path(report["bag"]).name}: success {report["success_rate"]:.2f} '
        f'(<= {report["tolerance_m"]:g} m)',
        fontsize=9,
    )
    ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _spread(values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {'median': None, 'mean': None, 'p95': None}
    return {
        'median': round(float(np.median(values)), 3),
        'mean': round(float(np.mean(values)), 3),
        'p95': round(float(np.percentile(values, 95)), 3),
    }
