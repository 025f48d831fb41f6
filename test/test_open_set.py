"""Open-set rejection on real data: campus_loop with a held-out stretch of the map and rows with
no true match, calibrated through the CLI on one split and measured on the other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlm_vpr.cli import main
from vlm_vpr.core.confidence import Calibration
from vlm_vpr.core.config import LocalizerConfig, SequenceConfig
from vlm_vpr.core.datasets import Traversal, read_dataset
from vlm_vpr.core.errors import ConfigError, DatasetError
from vlm_vpr.core.evaluation import (
    build_holdout_map,
    evaluate,
    parse_map_range,
    posed_queries,
    run_queries,
    summarize,
)
from vlm_vpr.core.localizer import Localizer
from vlm_vpr.core.map_format import read_map

HOLDOUT = '0.3:0.7'


@pytest.fixture(scope='module')
def calibrated_map(
    campus_map: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the campus map calibrated by `vlm-vpr calibrate` on the fit split."""
    out = tmp_path_factory.mktemp('open_set') / 'map'
    shutil.copytree(campus_map, out)
    report = out.parent / 'calibration.json'
    code = main(
        [
            'calibrate',
            '--map',
            str(out),
            '--dataset',
            str(data_root / 'campus_loop'),
            '--protocol',
            'interleaved',
            '--split',
            'fit',
            '--holdout-map-range',
            HOLDOUT,
            '--json',
            str(report),
            '--reliability-plot',
            str(out.parent / 'rel.png'),
        ]
    )
    assert code == 0
    assert (out.parent / 'rel.png').is_file()
    fit = json.loads(report.read_text())
    assert fit['split'] == 'fit' and fit['open_set']['num_out_of_map'] > 0
    return out


def test_out_of_map_queries_are_rejected_and_in_map_ones_accepted(
    calibrated_map: Path, data_root: Path
) -> None:
    campus = data_root / 'campus_loop'
    dataset, protocol, queries = posed_queries(
        campus / 'query' / 'images', campus / 'query' / 'poses.csv', 5.0, 'm'
    )
    localizer = Localizer(read_map(calibrated_map), LocalizerConfig())
    assert localizer.calibration.fitted

    report = run_queries(
        localizer, dataset, protocol, queries, progress=False, holdout=HOLDOUT, split='test'
    )

    rows = report['per_query']
    threshold = report['open_set']['threshold']
    held = parse_map_range(HOLDOUT, len(localizer.map))
    held_xy = localizer.map.positions_xyz[held, :2]
    outside = [q for q in rows if q['truth_xy'] is None]
    assert outside, 'the held-out stretch produced no out-of-map queries'
    for q in outside:  # their true place is in the held-out stretch
        truth = queries.xy[[p.name for p in queries.image_paths].index(q['query'])]
        assert np.hypot(*(held_xy - truth).T).min() <= 5.0
        assert q['confidence'] < threshold, q
        assert not set(q['top_ids']) & set(held.tolist())
    open_set = report['open_set']
    assert open_set['false_accept_rate'] == 0.0
    assert open_set['accepted_in_map'] > 0.0 and open_set['precision'] == 1.0
    assert open_set['recall_at_full_precision'] >= 0.5  # in-map ranked above every negative


def test_rows_without_x_y_count_as_out_of_map(
    campus_map: Path, data_root: Path, tmp_path: Path
) -> None:
    query = data_root / 'campus_loop' / 'query'
    lines = (query / 'poses.csv').read_text().splitlines()
    blanked = [lines[0]] + [
        f'{row.split(",")[0]},,,{row.split(",")[3]}' if i < 3 else row
        for i, row in enumerate(lines[1:7])
    ]
    (tmp_path / 'poses.csv').write_text('\n'.join(blanked) + '\n')
    dataset, protocol, queries = posed_queries(query / 'images', tmp_path / 'poses.csv', 5.0, 'm')
    report = run_queries(
        Localizer(read_map(campus_map)), dataset, protocol, queries, progress=False
    )
    assert [q['truth_xy'] is None for q in report['per_query']] == [True] * 3 + [False] * 3
    assert report['open_set']['num_out_of_map'] == 3 and report['num_in_map'] == 3


def test_eval_with_a_holdout_rebuilds_the_map_without_it_and_keeps_the_full_calibration(
    calibrated_map: Path, data_root: Path
) -> None:
    report = evaluate(
        data_root / 'campus_loop',
        'interleaved',
        map_dir=calibrated_map,
        progress=False,
        holdout=HOLDOUT,
        split='test',
    )

    full = read_map(calibrated_map)
    held = parse_map_range(HOLDOUT, len(full))
    assert report['holdout_map_ids'] == [int(held[0]), int(held[-1]) + 1]
    reduced = read_map(calibrated_map.with_name(f'map.holdout-{held[0]}-{held[-1] + 1}'))
    kept = [n for i, n in enumerate(full.content.image_names) if i not in set(held.tolist())]
    assert reduced.content.image_names == kept  # a true open set: never saw the held-out images
    assert not np.array_equal(reduced.content.codebook, full.content.codebook)
    calibration = Calibration.from_map(full, LocalizerConfig())
    rows = report['per_query']
    assert calibration.fitted and report['open_set']['num_out_of_map'] > 0
    assert [q['confidence'] for q in rows] == [calibration.confidence(q['evidence']) for q in rows]
    assert report['open_set']['false_accept_rate'] == 0.0


def test_eval_cross_fit_scores_out_of_fold_and_leaves_the_map_alone(
    calibrated_map: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stored = read_map(calibrated_map).extra_path('calibration').read_bytes()
    args = ['--dataset', str(data_root / 'campus_loop'), '--protocol', 'interleaved']
    args += ['--map', str(calibrated_map), '--holdout-map-range', HOLDOUT]
    out = tmp_path / 'cross.json'

    assert main(['eval', *args, '--cross-fit', '2', '--json', str(out)]) == 0

    report = json.loads(out.read_text())
    rows = report['per_query']
    assert report['cross_fit']['folds'] == 2 and report['open_set']['num_out_of_map'] > 0
    for k, fit in enumerate(report['cross_fit']['calibrations']):
        calibration = Calibration.from_json(fit)
        mine = [q for i, q in enumerate(rows) if (i // 10) % 2 == k]
        assert [q['confidence'] for q in mine] == [
            calibration.confidence(q['evidence']) for q in mine
        ]
    assert 'cross-fitted' in capsys.readouterr().out
    assert read_map(calibrated_map).extra_path('calibration').read_bytes() == stored
    assert main(['eval', *args, '--cross-fit', '2', '--split', 'test']) == 1
    assert '--cross-fit uses every query' in capsys.readouterr().err


def test_eval_rejects_a_map_built_from_another_traversal_than_the_protocols(
    campus_map: Path, data_root: Path, tmp_path: Path
) -> None:
    """Image names cannot tell traversals apart (Gardens Point's three share them): the map's
    source folder does."""
    dataset = tmp_path / 'campus_loop'  # the protocol's map traversal is the query images
    dataset.mkdir()
    shutil.copy(data_root / 'campus_loop' / 'dataset.yaml', dataset)
    for name in ('map', 'query'):
        (dataset / name).symlink_to(data_root / 'campus_loop' / 'query', target_is_directory=True)
    with pytest.raises(DatasetError, match='was built from .*campus_loop/map/images, not from'):
        evaluate(dataset, 'interleaved', map_dir=campus_map, progress=False)


def test_eval_accepts_the_map_it_builds_from_an_images_folder_that_is_a_link(
    data_root: Path, tmp_path: Path
) -> None:
    """The map stores its images folder resolved; the check resolved only the traversal, so
    a linked images folder failed the map eval had just built."""
    dataset = tmp_path / 'linked'
    dataset.mkdir()
    shutil.copy(data_root / 'campus_loop' / 'dataset.yaml', dataset)
    for name in ('map', 'query'):
        (dataset / name).mkdir()
        shutil.copy(data_root / 'campus_loop' / name / 'poses.csv', dataset / name)
        (dataset / name / 'images').symlink_to(data_root / 'campus_loop' / name / 'images')
    report = evaluate(dataset, 'interleaved', max_queries=3, progress=False)
    assert report['num_queries'] == 3


def test_holdout_map_rejects_a_map_of_another_traversal(campus_map: Path, data_root: Path) -> None:
    queries = read_dataset(data_root / 'campus_loop').traversal('query')
    with pytest.raises(DatasetError, match='was not built from query'):
        build_holdout_map(read_map(campus_map), queries, np.arange(3), progress=False)


@pytest.mark.parametrize(('text', 'expected'), [('0.25:0.5', range(5, 10)), ('3:7', range(3, 7))])
def test_parse_map_range_reads_fractions_and_indices(text: str, expected: range) -> None:
    assert parse_map_range(text, 20).tolist() == list(expected)


@pytest.mark.parametrize(
    ('text', 'match'),
    [
        ('5', 'not A:B'),
        ('a:b', 'not A:B'),
        ('0:20', 'not all'),
        ('7:3', 'some but not all'),
        ('0.5:1.5', 'some but not all'),
    ],
)
def test_parse_map_range_rejects_bad_ranges(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_map_range(text, 20)


def test_posed_queries_rejects_bad_units_and_tolerance(data_root: Path) -> None:
    query = data_root / 'campus_loop' / 'query'
    with pytest.raises(ConfigError, match='units'):
        posed_queries(query / 'images', query / 'poses.csv', 5.0, 'feet')
    with pytest.raises(ConfigError, match='tolerance'):
        posed_queries(query / 'images', query / 'poses.csv', 0.0, 'm')


def test_run_queries_rejects_spread_out_sequences_and_unknown_splits(
    campus_map: Path, data_root: Path
) -> None:
    query = data_root / 'campus_loop' / 'query'
    dataset, protocol, queries = posed_queries(query / 'images', query / 'poses.csv', 5.0, 'm')
    localizer = Localizer(read_map(campus_map), LocalizerConfig(sequence=SequenceConfig(length=3)))
    with pytest.raises(ConfigError, match='consecutive'):
        run_queries(localizer, dataset, protocol, queries, max_queries=5)
    with pytest.raises(ConfigError, match='split'):
        run_queries(localizer, dataset, protocol, queries, split='train')


def test_run_queries_names_why_it_selects_no_query(campus_map: Path, data_root: Path) -> None:
    query = data_root / 'campus_loop' / 'query'
    dataset, protocol, queries = posed_queries(query / 'images', query / 'poses.csv', 5.0, 'm')
    few = Traversal(queries.name, queries.image_paths[:5], queries.xy[:5], queries.yaw_rad[:5])
    single = Localizer(read_map(campus_map), LocalizerConfig())
    with pytest.raises(DatasetError, match=r'--split test selects no query: .* 5 queries'):
        run_queries(single, dataset, protocol, few, progress=False, split='test')
    with pytest.raises(DatasetError, match='--max-queries 0 selects no query'):
        run_queries(single, dataset, protocol, queries, max_queries=0, progress=False)
    with pytest.raises(DatasetError, match='--max-queries -3 selects no query'):
        run_queries(single, dataset, protocol, queries, max_queries=-3, progress=False)
    sequence = Localizer(read_map(campus_map), LocalizerConfig(sequence=SequenceConfig(length=3)))
    with pytest.raises(DatasetError, match='--split test selects no query'):
        run_queries(sequence, dataset, protocol, few, progress=False, split='test')


def test_summarize_of_no_queries_is_an_empty_report(data_root: Path) -> None:
    dataset = read_dataset(data_root / 'campus_loop')
    report = summarize([], dataset, 'interleaved')
    assert report['num_queries'] == report['num_in_map'] == 0
    assert report['recall'] == {'1': 0.0, '5': 0.0, '10': 0.0} and report['recall_curve'] == []
    assert report['open_set']['pr_curve'] == [] and report['open_set']['ece'] == 0.0


@pytest.mark.parametrize(
    ('args', 'match'),
    [
        (['--images', 'q/images'], '--images needs --poses'),
        (['--dataset', 'some/data'], '--dataset needs --protocol'),
    ],
)
def test_calibrate_cli_names_the_missing_arguments(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(['calibrate', '--map', str(tmp_path / 'map'), *args]) == 1
    assert match in capsys.readouterr().err


@pytest.mark.parametrize('source', ['dataset', 'images'])
def test_calibrating_an_uncalibrated_map_does_not_warn_that_it_has_no_calibration(
    source: str,
    campus_map: Path,
    data_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    map_dir = tmp_path / 'map'
    shutil.copytree(campus_map, map_dir)
    campus = data_root / 'campus_loop'
    if source == 'dataset':
        queries = ['--dataset', str(campus), '--protocol', 'interleaved']
    else:
        queries = ['--images', str(campus / 'query' / 'images')]
        queries += ['--poses', str(campus / 'query' / 'poses.csv'), '--tolerance', '5']
    calibrate = ['calibrate', '--map', str(map_dir), *queries, '--holdout-map-range', HOLDOUT]
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):
        assert main(calibrate) == 0
    assert 'no confidence calibration' not in caplog.text
    assert Calibration.from_map(read_map(map_dir), LocalizerConfig()).fitted
    with caplog.at_level('WARNING', logger='vlm_vpr.core.confidence'):  # the warning exists
        Calibration.from_map(read_map(campus_map), LocalizerConfig())
    assert 'has no confidence calibration yet' in caplog.text
