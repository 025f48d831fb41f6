"""`vlm-vpr eval-bag`: the Localizer over a bag with ground-truth poses (no ROS needed)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.cli import main
from vlm_vpr.core import bag_eval
from vlm_vpr.core.bag_eval import evaluate_bags
from vlm_vpr.core.bags import ODOMETRY, BagWriter, write_traversal_bag
from vlm_vpr.core.confidence import Calibration, stored_calibrations
from vlm_vpr.core.config import LocalizerConfig, SequenceConfig
from vlm_vpr.core.datasets import Traversal, read_traversal
from vlm_vpr.core.errors import BagError
from vlm_vpr.core.evaluation import build_holdout_map, parse_map_range
from vlm_vpr.core.images import read_image
from vlm_vpr.core.initial_pose import InitialPoseConfig, InitialPoseGate
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map
from vlm_vpr.core.sequence import SequenceMatcher
from vlm_vpr.core.types import Pose, planar_motion, wrap_angle

IMAGE_TOPIC, TRUTH_TOPIC = '/camera/image_raw', '/ground_truth/pose'


@pytest.fixture(scope='module')
def six(data_root: Path) -> Traversal:
    """Six campus_loop queries spread along the loop."""
    full = read_traversal(data_root / 'campus_loop' / 'query')
    ids = np.linspace(0, len(full) - 1, 6).astype(int)
    return replace(
        full,
        image_paths=[full.image_paths[i] for i in ids],
        xy=full.xy[ids],
        yaw_rad=full.yaw_rad[ids],
    )


@pytest.fixture(scope='module')
def bag(six: Traversal, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six queries as Image + PoseStamped, each pose stamped as its image."""
    return write_traversal_bag(six, tmp_path_factory.mktemp('bags') / 'six')


@pytest.fixture(scope='module')
def between_bag(six: Traversal, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six queries (one a second), with no pose at an image stamp: each image lies a
    quarter of the way from a pose 0.125 s before it to one 0.375 s after it, placed so that
    the linear interpolation (position and yaw) there is the query's true pose."""
    start, second = 1_700_000_000_000_000_000, 1_000_000_000
    with BagWriter(tmp_path_factory.mktemp('bags') / 'between') as writer:
        for i, image_path in enumerate(six.image_paths):
            stamp = start + i * second
            writer.write_image(IMAGE_TOPIC, stamp, read_image(image_path))
            (x, y), yaw = six.xy[i], float(six.yaw_rad[i])
            before = Pose.from_yaw(x - 1.0, y + 0.5, yaw - 0.2)
            after = Pose.from_yaw(x + 3.0, y - 1.5, yaw + 0.6)
            writer.write_pose(TRUTH_TOPIC, stamp - second // 8, before)
            writer.write_pose(TRUTH_TOPIC, stamp + 3 * second // 8, after)
    return writer.path


def test_eval_bag_scores_every_frame_against_the_interpolated_truth(
    campus_map: Path, six: Traversal, bag: Path, between_bag: Path
) -> None:
    for source in (bag, between_bag):
        check_bag_report(campus_map, source, six)


def check_bag_report(campus_map: Path, source: Path, six: Traversal) -> None:
    report = evaluate_bags(
        campus_map,
        [source],
        IMAGE_TOPIC,
        TRUTH_TOPIC,
        tolerance_m=5.0,
        confidence_threshold=0.5,
        progress=False,
    )
    frames = report['per_query']
    assert report['num_frames'] == len(frames) == 6
    for i, f in enumerate(frames):
        # the true pose of query i: stamped with the image, or interpolated between two poses
        (x, y), yaw = six.xy[i], six.yaw_rad[i]
        assert f['truth'][:2] == pytest.approx([x, y], abs=1e-6), source.name
        assert abs(wrap_angle(f['truth'][2] - yaw)) < 1e-6, source.name
        assert f['error_m'] == pytest.approx(math.hypot(f['pose'][0] - x, f['pose'][1] - y))
        assert f['yaw_error_deg'] is not None and f['pose'][2] is not None
        assert f['yaw_error_deg'] == pytest.approx(
            abs(math.degrees(wrap_angle(f['pose'][2] - yaw))), abs=1e-4
        )
    assert max(f['yaw_error_deg'] for f in frames) > 0  # an estimate, not the truth itself
    correct = [f['error_m'] <= 5.0 for f in frames]
    accepted = [f['confidence'] >= 0.5 for f in frames]
    assert report['success_rate'] == pytest.approx(np.mean(correct), abs=1e-4)
    wrong_accepted = sum(a and not c for a, c in zip(accepted, correct))
    assert report['at_threshold']['wrong_share_of_accepted'] == pytest.approx(
        wrong_accepted / sum(accepted) if any(accepted) else 0.0, abs=1e-4
    )
    ranks = [f['first_correct_rank'] for f in frames]
    assert report['recall']['1'] == pytest.approx(np.mean([r == 1 for r in ranks]), abs=1e-4)
    assert report['recall']['1'] <= report['recall']['5'] <= report['recall']['10']
    assert report['success_rate'] >= 0.5  # the real map localises most of these
    assert {'extract', 'aggregate', 'search', 'total'} <= set(report['timing_ms'])
    assert report['timing_ms']['total']['p95'] >= report['timing_ms']['total']['median'] > 0


def test_eval_bag_skips_a_frame_without_features_as_the_node_does(
    campus_map: Path, six: Traversal, tmp_path: Path
) -> None:
    start, second = 1_700_000_000_000_000_000, 1_000_000_000
    with BagWriter(tmp_path / 'dark') as writer:  # a camera that starts dark
        for i, image_path in enumerate(six.image_paths):
            image = read_image(image_path)
            writer.write_image(IMAGE_TOPIC, start + i * second, image if i else image * 0)
            writer.write_pose(TRUTH_TOPIC, start + i * second, six.pose(i))
            writer.write_pose(
                '/odom', start + i * second, six.pose(i), msgtype=ODOMETRY, frame_id='odom'
            )
    report = evaluate_bags(
        campus_map, [writer.path], IMAGE_TOPIC, TRUTH_TOPIC, odom_topic='/odom', progress=False
    )
    assert (report['num_frames'], report['frames_without_features']) == (5, 1)
    stamps = [f['stamp_ns'] for f in report['per_query']]
    assert stamps == [start + i * second for i in range(1, 6)]
    # nor does it start the odometry: the first frame localised has no step, as in the node
    assert report['per_query'][0]['odometry_step_m'] is None


def test_eval_bag_runs_the_nodes_initial_pose_gate_on_the_frames(
    campus_map: Path, bag: Path
) -> None:
    def run(frames: int, distance_m: float, tolerance_m: float = 5.0) -> dict:
        return evaluate_bags(
            campus_map,
            [bag],
            IMAGE_TOPIC,
            TRUTH_TOPIC,
            tolerance_m=tolerance_m,
            confidence_threshold=0.0,
            initial_pose=InitialPoseConfig(
                consecutive_frames=frames, max_distance_m=distance_m, max_yaw_deg=180.0
            ),
            progress=False,
        )

    report = run(3, 1000.0)  # every frame confident and agreeing: a run of 3, re-armed
    assert [r['initial_pose'] for r in report['per_query']] == [False, False, True] * 2
    published = [r for r in report['per_query'] if r['initial_pose']]
    assert report['initial_pose'] == {
        'published': 2,
        'wrong': sum(r['error_m'] > 5.0 for r in published),
        'out_of_map': 0,
    }
    assert report['initial_pose_gate']['consecutive_frames'] == 3
    # the six frames are spread along the loop, tens of metres apart: never agree within 1 m
    assert run(2, 1.0)['initial_pose']['published'] == 0
    assert run(1, 1.0)['initial_pose']['published'] == 6  # one frame needs no agreement
    # within 1 cm of the truth no pose is right and no map image lies that close to a frame's
    # place: every publication is wrong and off the map
    strict = run(1, 1.0, tolerance_m=0.01)['initial_pose']
    assert strict == {'published': 6, 'wrong': 6, 'out_of_map': 6}


def test_eval_bag_with_odometry_votes_and_gates_as_a_direct_loop_with_the_odometry_steps(
    campus_map: Path, data_root: Path, tmp_path: Path
) -> None:
    """A drive that stops and speeds up (query frames repeated and skipped), with Odometry:
    every row is what the Localizer, SequenceMatcher and gate give when fed the distance and
    motion between the true poses, as the node does with odom_topic."""
    full = read_traversal(data_root / 'campus_loop' / 'query')
    ids = [0, 1, 2, 2, 2, 3, 4, 6, 8, 9, 9, 10, 12, 14, 15, 16]
    drive = replace(
        full,
        image_paths=[full.image_paths[i] for i in ids],
        xy=full.xy[ids],
        yaw_rad=full.yaw_rad[ids],
    )
    bag = write_traversal_bag(drive, tmp_path / 'drive', odom_topic='/odom')
    config = LocalizerConfig(sequence=SequenceConfig(length=4))
    gate_config = InitialPoseConfig(consecutive_frames=2, max_distance_m=3.0, max_yaw_deg=180.0)

    def run(**odometry: str) -> list[dict]:
        return evaluate_bags(
            campus_map,
            [bag],
            IMAGE_TOPIC,
            TRUTH_TOPIC,
            config,
            confidence_threshold=0.0,
            initial_pose=gate_config,
            progress=False,
            **odometry,
        )['per_query']

    rows = run(odom_topic='/odom', odom_frame='map')
    localizer = Localizer(read_map(campus_map), config)
    matcher, gate = SequenceMatcher(localizer), InitialPoseGate()
    for i, row in enumerate(rows):
        motion = planar_motion(drive.pose(i - 1), drive.pose(i)) if i else None
        step = math.hypot(motion.x, motion.y) if motion else None
        result = matcher.update(localizer.localize(read_image(drive.image_paths[i])), step)
        published = gate.update(result.pose, result.confidence, motion, gate_config, 0.0)
        if published:
            gate.rearm()
        assert row['odometry_step_m'] == pytest.approx(step)
        assert row['evidence'] == pytest.approx(result.evidence)
        assert row['initial_pose'] == published
    assert sum(r['odometry_step_m'] == 0.0 for r in rows) == 3  # the stops
    by_order = run()
    assert all(r['odometry_step_m'] is None for r in by_order)
    assert any(a['evidence'] != pytest.approx(b['evidence']) for a, b in zip(rows, by_order))


def test_eval_bag_cli_writes_the_json_report_and_trajectory_plot(
    campus_map: Path, bag: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            'eval-bag',
            str(bag),
            '--map',
            str(campus_map),
            '--image-topic',
            IMAGE_TOPIC,
            '--truth-topic',
            TRUTH_TOPIC,
            '--max-frames',
            '2',
            '--tolerance',
            '2',
            '--set',
            'initial_pose.consecutive_frames=1',
            '--json',
            str(tmp_path / 'r.json'),
            '--plot',
            str(tmp_path / 'r.png'),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['num_frames'] == 2 and report['bag'] == str(bag)
    assert report['tolerance_m'] == 2.0
    assert report['initial_pose_gate']['consecutive_frames'] == 1
    assert (tmp_path / 'r.png').read_bytes()[:4] == b'\x89PNG'
    out = capsys.readouterr().out
    assert 'R@1' in out and 'false accepts' in out and '/initialpose gate (1 frames' in out


def test_eval_bag_rejects_a_missing_topic_and_a_bad_tolerance(
    campus_map: Path, bag: Path, capsys
) -> None:
    with pytest.raises(BagError, match='topic /nope is not in the bag'):
        evaluate_bags(campus_map, [bag], '/nope', TRUTH_TOPIC, progress=False)
    with pytest.raises(BagError, match='the tolerance must be > 0 m'):
        evaluate_bags(campus_map, [bag], IMAGE_TOPIC, TRUTH_TOPIC, tolerance_m=0.0)
    with pytest.raises(BagError, match='--max-frames must be >= 1, got -1'):
        evaluate_bags(campus_map, [bag], IMAGE_TOPIC, TRUTH_TOPIC, max_frames=-1)
    with pytest.raises(BagError, match=r'--confidence-threshold must be in \[0, 1\], got 1.5'):
        evaluate_bags(campus_map, [bag], IMAGE_TOPIC, TRUTH_TOPIC, confidence_threshold=1.5)
    assert (
        main(
            [
                'eval-bag',
                str(bag),
                '--map',
                str(campus_map),
                '--image-topic',
                '/nope',
                '--truth-topic',
                TRUTH_TOPIC,
            ]
        )
        == 1
    )
    assert 'topic /nope is not in the bag' in capsys.readouterr().err
    topics = ['--image-topic', IMAGE_TOPIC, '--truth-topic', TRUTH_TOPIC]
    assert (
        main(['eval-bag', str(bag), '--map', str(campus_map), *topics, '--odom-topic', '/o']) == 1
    )
    assert 'topic /o is not in the bag' in capsys.readouterr().err


def test_every_bag_is_checked_before_the_models_load(
    campus_map: Path, bag: Path, six: Traversal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong topic in the last bag fails at once, not after the models (minutes for a VLM)
    loaded and the first bags ran; a bag given twice too."""
    with BagWriter(tmp_path / 'other_truth') as writer:
        writer.write_image(IMAGE_TOPIC, 1, read_image(six.image_paths[0]))
        writer.write_pose('/gt', 1, six.pose(0))

    def no_models(*args: object, **kwargs: object) -> None:
        raise AssertionError('the models were loaded before the bags were checked')

    monkeypatch.setattr(bag_eval, 'Localizer', no_models)
    with pytest.raises(BagError, match=f'topic {TRUTH_TOPIC} is not in the bag'):
        evaluate_bags(campus_map, [bag, writer.path], IMAGE_TOPIC, TRUTH_TOPIC, progress=False)
    with pytest.raises(BagError, match='--bag names one bag twice'):
        evaluate_bags(campus_map, [bag, bag], IMAGE_TOPIC, TRUTH_TOPIC, progress=False)


@pytest.fixture(scope='module')
def holdout_map(
    campus_map: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The campus map rebuilt without its images 0.3:0.7 (a robot that drives off its map)."""
    full = tmp_path_factory.mktemp('bag_calibration') / 'map'
    shutil.copytree(campus_map, full)
    vpr_map = read_map(full)
    traversal = read_traversal(data_root / 'campus_loop' / 'map')
    return build_holdout_map(
        vpr_map, traversal, parse_map_range('0.3:0.7', len(vpr_map)), progress=False
    )


def test_calibrate_on_a_bag_fits_on_its_frames_and_the_map_then_rejects_out_of_map_frames(
    holdout_map: Path,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    drive = write_traversal_bag(
        read_traversal(data_root / 'campus_loop' / 'query'), tmp_path / 'q'
    )
    topics = ['--image-topic', IMAGE_TOPIC, '--truth-topic', TRUTH_TOPIC]
    calibrate = ['calibrate', '--map', str(holdout_map), '--bag', str(drive), *topics]
    assert read_map(holdout_map).read_extra_json('calibration') is None
    outputs = ['--json', str(tmp_path / 'fit.json'), '--reliability-plot', str(tmp_path / 'r.png')]
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        assert main([*calibrate, *outputs]) == 0
    assert 'calibration stored in' in capsys.readouterr().out
    assert 'no confidence calibration' not in caplog.text  # it is being fitted: no warning
    assert (tmp_path / 'r.png').read_bytes()[:4] == b'\x89PNG'

    fit = json.loads((tmp_path / 'fit.json').read_text())
    rows = fit['per_query']
    # scored before the fit: left out of the calibrate report (eval-bag measures them)
    assert not {'at_threshold', 'initial_pose', 'initial_pose_gate'} & set(fit)
    assert not any('initial_pose' in r for r in rows)
    out_of_map = [r for r in rows if r['truth_xy'] is None]
    assert len(rows) == 36 and 5 <= len(out_of_map) <= 20  # the held-out stretch
    assert all(r['first_correct_rank'] is None for r in out_of_map)
    stored = Calibration.from_map(read_map(holdout_map), LocalizerConfig())
    expected = Calibration.fit(
        [r['evidence'] for r in rows],
        [r['first_correct_rank'] == 1 for r in rows],
        settings={'rerank.chain': [], 'sequence.length': 1},
    )
    assert stored == expected

    report = evaluate_bags(holdout_map, [drive], IMAGE_TOPIC, TRUTH_TOPIC, progress=False)
    for row in report['per_query']:
        assert row['confidence'] == pytest.approx(expected.confidence(row['evidence']))
    open_set = report['open_set']
    assert open_set['num_out_of_map'] == len(out_of_map)
    assert open_set['false_accept_rate'] == 0.0 and open_set['accepted_in_map'] > 0.3
    assert report['initial_pose']['out_of_map'] == 0  # no /initialpose off the map
    every_frame = evaluate_bags(  # a gate that publishes every frame: the off-map ones counted
        holdout_map,
        [drive],
        IMAGE_TOPIC,
        TRUTH_TOPIC,
        confidence_threshold=0.0,
        initial_pose=InitialPoseConfig(consecutive_frames=1),
        progress=False,
    )
    assert every_frame['initial_pose']['out_of_map'] == len(out_of_map)
    in_map = [r for r in report['per_query'] if r['truth_xy'] is not None]
    assert report['recall']['1'] == pytest.approx(
        np.mean([r['first_correct_rank'] == 1 for r in in_map]), abs=1e-4
    )

    sequence_fit = ['--sequence', '3', '--tolerance', '4', '--json', str(tmp_path / 'seq.json')]
    assert main([*calibrate, *sequence_fit]) == 0  # frames vote in bag order
    assert json.loads((tmp_path / 'seq.json').read_text())['tolerance_m'] == 4.0
    stored = stored_calibrations(read_map(holdout_map).read_extra_json('calibration'))
    assert [c.settings['sequence.length'] for c in stored] == [1, 3]
    assert stored[1].off_track is not None  # the sequence fit: on-track rule and constant


def test_calibrate_on_several_bags_fits_on_all_their_frames_each_bag_run_afresh(
    holdout_map: Path, data_root: Path, tmp_path: Path
) -> None:
    queries = read_traversal(data_root / 'campus_loop' / 'query')
    second_half = replace(  # a second drive: the loop's second half, starting mid-route
        queries,
        image_paths=queries.image_paths[18:],
        xy=queries.xy[18:],
        yaw_rad=queries.yaw_rad[18:],
    )
    drives = [
        write_traversal_bag(queries, tmp_path / 'one'),
        write_traversal_bag(second_half, tmp_path / 'two'),
    ]
    calibrated = tmp_path / 'map'
    shutil.copytree(holdout_map, calibrated)
    topics = ['--image-topic', IMAGE_TOPIC, '--truth-topic', TRUTH_TOPIC, '--sequence', '3']
    bags = [arg for drive in drives for arg in ('--bag', str(drive))]
    fit_json = tmp_path / 'fit.json'
    args = ['calibrate', '--map', str(calibrated), *bags, *topics, '--json', str(fit_json)]
    plot = tmp_path / 'r.png'
    assert main([*args, '--reliability-plot', str(plot)]) == 0
    assert plot.read_bytes()[:4] == b'\x89PNG'

    fit = json.loads(fit_json.read_text())
    config = LocalizerConfig(sequence=SequenceConfig(length=3))
    alone = [  # each drive on its own, with the default confidence the fit starts from
        evaluate_bags(
            calibrated,
            [drive],
            IMAGE_TOPIC,
            TRUTH_TOPIC,
            config,
            calibration=Calibration(),
            progress=False,
        )
        for drive in drives
    ]
    assert fit['bags'] == [str(drive) for drive in drives] and 'bag' not in fit
    rows = fit['per_query']
    assert [r['bag'] for r in rows] == [str(drives[0])] * 36 + [str(drives[1])] * 18
    # the second drive's sequence starts afresh: its evidence is that of the drive alone
    # (carried over from the first drive, the first frames would vote with its last ones)
    for pooled, single in zip(rows, alone[0]['per_query'] + alone[1]['per_query']):
        assert pooled['evidence'] == pytest.approx(single['evidence'])
    assert fit['num_frames'] == 54
    assert fit['num_in_map'] == alone[0]['num_in_map'] + alone[1]['num_in_map']
    single_keys = set(alone[0]) - {'bag', 'at_threshold', 'initial_pose', 'initial_pose_gate'}
    assert set(fit) == single_keys | {'bags', 'calibration'}
    stored = Calibration.from_map(read_map(calibrated), config)
    expected = Calibration.fit(
        [r['evidence'] for r in rows],
        [r['first_correct_rank'] == 1 for r in rows],
        settings={'rerank.chain': [], 'sequence.length': 3},
    )
    assert stored == expected
