"""The benchmark's pieces on tiny sizes: every part runs and reports its figures (no timing
assertions: a benchmark measures, it does not pass or fail on speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
TINY = [
    '--quick',
    '--build-images',
    '8',
    '--map-images',
    '600',
    '--memory-map-size',
    '800',
    '--max-map-size',
    '1000',
    '--runs',
    '2',
    '--queries',
    '3',
    '--photos',
    '2',
    '--rerank-queries',
    '1',
    '--generation-s',
    '0',
    '--node-frames',
    '2',
    '--backbones',
    'rootsift',
    '--anyloc',
    'S224',
    '--dtypes',
    'int8',
]


@pytest.fixture(scope='module')
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_runs_every_part_on_tiny_sizes_and_reports_each_figure(bench, data_root: Path):
    args = bench.parse_args([*TINY, '--data', str(data_root)])
    rows = bench.run(args)
    failed = [f'{row.figure}: {row.measured}' for row in rows if 'FAILED' in row.measured]
    assert not failed
    figures = [(row.section, row.figure) for row in rows]
    expected = [
        (1, 'dense RootSIFT 240 px: Gardens Point 960x540 JPEG, 600-image map'),
        (2, 'ViT-S/14 224x224 descriptor, median vs AnyLoc 82 ms'),
        (2, 'ViT-S/14 224 px: cosine of the int8 descriptor to float32'),
        (2, 'ViT-S/14 224 px: cosine of the int8 OpenVINO descriptor to float32'),
        (3, 'exact (flat float16, 1024-d), 1k images'),
        (3, 'IVF float16 (nlist sqrt(N), nprobe 32, trained on <= 100000 rows), 1k images'),
        (3, 'latency growth 1k -> 1k'),
        (3, 'approximate search at 1M images'),
        (4, 'map build, dense RootSIFT 240 px, 8 images'),
        (5, 'map size per 10k images'),
        (5, 'resident memory of a process holding a 800-image map'),
        (6, 'K = 10, map descriptions precomputed'),
        (6, 'K = 50, map descriptions precomputed'),
        (6, 'K = 100, map descriptions precomputed'),
        (7, 'image receipt -> pose publish, 600-image dense RootSIFT map'),
    ]
    for section, start in expected:
        assert any(s == section and f.startswith(start) for s, f in figures), start
    assert all((row.target != '') == isinstance(row.ok, bool) for row in rows)
    rerank = [row for row in rows if row.section == 6]
    assert all(row.measured.startswith('1 VLM call(s)') for row in rerank)
    table = bench.format_table(rows).splitlines()
    assert table[0] == '| figure | measured | target | ok? |'
    assert len(table) == 2 + len(rows) + len({row.section for row in rows})


def test_a_failing_part_gives_a_failed_row_and_the_next_part_still_runs(bench, tmp_path: Path):
    rows = bench.run(
        bench.parse_args(
            [*TINY, '--data', str(tmp_path), '--skip', 'anyloc', 'memory', 'rerank', 'node']
        )
    )
    assert [(row.section, row.figure) for row in rows] == [(1, 'frame part'), (3, 'search part')]
    assert all(row.measured.startswith('FAILED: DatasetError') and row.ok is False for row in rows)


def test_replicated_rows_are_unit_vectors_as_similar_as_adjacent_rows(bench):
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=(50, 256)), axis=0)  # neighbours alike, like a route
    base = walk / np.linalg.norm(walk, axis=1, keepdims=True)
    adjacent = float(np.median((base[:-1] * base[1:]).sum(axis=1)))
    stored = bench.replicate(base, 5000, bench.replication_noise(base), seed=1)
    assert stored.dtype == np.float16 and stored.shape == (5000, 256)
    copies = stored.astype(np.float32)
    assert np.allclose(np.linalg.norm(copies, axis=1), 1.0, atol=2e-3)
    same_image = (copies[:-50] * copies[50:]).sum(axis=1)  # row i and i + 50 copy one image
    assert abs(float(np.median(same_image)) - adjacent) < 0.03
    halves = bench.replicate(base, 70, 0.5, seed=2, project=lambda rows: rows[:, :128])
    assert halves.shape == (70, 128) and halves.dtype == np.float16


@pytest.mark.parametrize('count', ['1', '513'])
def test_bench_rejects_build_images_outside_what_its_large_maps_can_copy(
    bench, count: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(['--build-images', count])
    assert '--build-images must be in [2, 512] (vlad.pca_dim)' in capsys.readouterr().err


def synthetic_rows(rng: np.random.Generator, n: int) -> list[dict]:
    """Report rows (evidence, truth, rank): the last 10 of every 50 queries are out of the map
    (never correct); an in-map query is correct with a probability rising with its score."""
    score = rng.normal(size=n)
    out_of_map = np.arange(n) % 50 >= 40
    correct = ~out_of_map & (rng.random(n) < 1 / (1 + np.exp(-3 * score)))
    return [
        {
            'evidence': {'top1_score': float(s), 'margin': float(s) / 2},
            'truth_xy': None if o else [0.0, 0.0],
            'first_correct_rank': 1 if c else None,
        }
        for s, o, c in zip(score, out_of_map, correct)
    ]


def test_calibration_size_refits_on_block_subsets_and_measures_each_fit_on_the_test_split(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import calibration_size
    finally:
        sys.path.remove(str(BENCHMARKS))
    from vlm_vpr.core.calibration import fit_rows, open_set_report
    from vlm_vpr.core.config import LocalizerConfig

    rng = np.random.default_rng(3)
    fit, test = synthetic_rows(rng, 200), synthetic_rows(rng, 300)
    rows = calibration_size.measure(fit, test, sizes=[1, 5, 20], draws=40, seed=0)
    assert [(r['blocks'], r['queries']) for r in rows] == [(1, 10), (5, 50), (20, 200)]
    assert [r['fits'] + r['failed_fits'] for r in rows] == [40, 40, 1]
    assert rows[0]['failed_fits'] > 0  # a block out of the map has no correct query: no fit
    # each size draws with its own seed: its row does not depend on the other sizes asked for
    assert calibration_size.measure(fit, test, sizes=[5], draws=40, seed=0)[0] == rows[1]

    # all the blocks: one fit, the calibration `vlm-vpr calibrate` would store, measured on the
    # test rows as `vlm-vpr eval` measures it (open_set_report)
    calibration = fit_rows(fit, LocalizerConfig())
    rescored = [dict(q, confidence=calibration.confidence(q['evidence'])) for q in test]
    report = open_set_report(rescored, LocalizerConfig().confidence.initial_pose_threshold)
    false_accepts = round(report['false_accept_rate'] * report['num_out_of_map'])
    full = rows[-1]
    assert full['false_accepts_max'] == false_accepts
    assert full['with_false_accept'] == float(false_accepts > 0)
    assert full['accepted_in_map_median'] == pytest.approx(report['accepted_in_map'], abs=1e-4)
    assert full['ece_median'] == pytest.approx(report['ece'], abs=1e-4)

    (tmp_path / 'fit.json').write_text(json.dumps({'per_query': fit}))
    (tmp_path / 'test.json').write_text(json.dumps({'per_query': test}))
    calibration_size.main(
        [
            '--fit',
            str(tmp_path / 'fit.json'),
            '--test',
            str(tmp_path / 'test.json'),
            '--sizes',
            '5',
            '20',
            '--draws',
            '3',
        ]
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0] == 'test split: 240 in / 60 out of map'
    assert len(table) == 3 + 2 and table[-1].startswith('| 20 (200) | 1 (0) |')


def test_kidnap_feeds_stretches_to_one_matcher_and_reports_each(
    campus_map: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import kidnap
    finally:
        sys.path.remove(str(BENCHMARKS))
    from vlm_vpr.core.config import LocalizerConfig, SequenceConfig
    from vlm_vpr.core.localizer import Localizer

    localizer = Localizer.from_map_path(
        campus_map, LocalizerConfig(sequence=SequenceConfig(length=3))
    )
    dataset = str(data_root / 'campus_loop')
    rows = kidnap.measure(localizer, dataset, 'interleaved', [(0, 12), (24, 36)])

    assert [(r['stretch'], r['frames']) for r in rows] == [('0:12', 12), ('24:36', 12)]
    # campus_loop is easy (Recall@1 1.0): a cold start is on track within L frames; carried
    # from query 11 to 24 unannounced, the old track runs on for a few frames first
    assert rows[0]['first_on_track'] is not None and rows[0]['first_on_track'] < 3
    assert rows[1]['first_on_track'] is not None and rows[1]['first_on_track'] >= 3
    assert [r['accepted_wrong'] for r in rows] == [0, 0]

    kidnap.main(
        ['--dataset', dataset, '--protocol', 'interleaved', '--map', str(campus_map)]
        + ['--stretch', '0:5', '--sequence', '3']
    )
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[-1].startswith('| 0:5 | ')
