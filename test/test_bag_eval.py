"""`vlm-vpr eval-bag`: the Localizer over a bag with ground-truth poses (no ROS needed)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.cli import main
from vlm_vpr.core.bag_eval import evaluate_bag
from vlm_vpr.core.bags import write_traversal_bag
from vlm_vpr.core.datasets import read_traversal
from vlm_vpr.core.errors import BagError

IMAGE_TOPIC, TRUTH_TOPIC = '/camera/image_raw', '/ground_truth/pose'


@pytest.fixture(scope='module')
def bag(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six campus_loop queries spread along the loop, as Image + PoseStamped."""
    full = read_traversal(data_root / 'campus_loop' / 'query')
    ids = np.linspace(0, len(full) - 1, 6).astype(int)
    subset = replace(
        full,
        image_paths=[full.image_paths[i] for i in ids],
        xy=full.xy[ids],
        yaw_rad=full.yaw_rad[ids],
    )
    return write_traversal_bag(subset, tmp_path_factory.mktemp('bags') / 'six')


def test_eval_bag_scores_every_frame_against_the_interpolated_truth(
    campus_map: Path, bag: Path
) -> None:
    report = evaluate_bag(
        campus_map,
        bag,
        IMAGE_TOPIC,
        TRUTH_TOPIC,
        tolerance_m=5.0,
        confidence_threshold=0.5,
        progress=False,
    )
    frames = report['per_frame']
    assert report['num_frames'] == len(frames) == 6
    for f in frames:
        assert f['error_m'] == pytest.approx(
            math.hypot(f['pose'][0] - f['truth'][0], f['pose'][1] - f['truth'][1])
        )
        assert f['yaw_error_deg'] is None or 0 <= f['yaw_error_deg'] <= 180
    correct = [f['error_m'] <= 5.0 for f in frames]
    accepted = [f['confidence'] >= 0.5 for f in frames]
    assert report['success_rate'] == pytest.approx(np.mean(correct), abs=1e-4)
    wrong_accepted = sum(a and not c for a, c in zip(accepted, correct))
    assert report['at_threshold']['false_positive_rate'] == pytest.approx(
        wrong_accepted / sum(accepted) if any(accepted) else 0.0, abs=1e-4
    )
    ranks = [f['first_correct_rank'] for f in frames]
    assert report['recall']['1'] == pytest.approx(np.mean([r == 1 for r in ranks]), abs=1e-4)
    assert report['recall']['1'] <= report['recall']['5'] <= report['recall']['10']
    assert report['success_rate'] >= 0.5  # the real map localises most of these
    assert {'extract', 'aggregate', 'search', 'total'} <= set(report['timing_ms'])
    assert report['timing_ms']['total']['p95'] >= report['timing_ms']['total']['median'] > 0


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
            '--json',
            str(tmp_path / 'r.json'),
            '--plot',
            str(tmp_path / 'r.png'),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['num_frames'] == 2 and report['bag'] == str(bag)
    assert (tmp_path / 'r.png').read_bytes()[:4] == b'\x89PNG'
    assert 'R@1' in capsys.readouterr().out


def test_eval_bag_rejects_a_missing_topic_and_a_bad_tolerance(
    campus_map: Path, bag: Path, capsys
) -> None:
    with pytest.raises(BagError, match='topic /nope is not in the bag'):
        evaluate_bag(campus_map, bag, '/nope', TRUTH_TOPIC, progress=False)
    with pytest.raises(BagError, match='--tolerance-m must be > 0'):
        evaluate_bag(campus_map, bag, IMAGE_TOPIC, TRUTH_TOPIC, tolerance_m=0.0)
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
