"""The `vlm-vpr` CLI end to end on real data, and its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm_vpr.cli import main, read_config_yaml
from vlm_vpr.core.map_describe import load_regions
from vlm_vpr.core.map_format import read_map


def test_map_build_info_and_localize_on_corridor(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ref = data_root / 'corridor' / 'ref'
    out = tmp_path / 'corridor_map'
    assert (
        main(
            [
                'map',
                'build',
                '--images',
                str(ref / 'images'),
                '--poses',
                str(ref / 'poses.csv'),
                '--out',
                str(out),
                '--set',
                'vlad.num_clusters=16',
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary['num_images'] == 111 and summary['num_clusters'] == 16

    assert main(['map', 'info', str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['retrieval_mb'] > 0 and info['thumbnails_mb'] > 0

    query = data_root / 'corridor' / 'query' / 'images'
    images = [str(query / '0000040.jpg'), str(query / '0000080.jpg')]
    assert main(['localize', '--map', str(out), '--set', 'top_k=3', *images]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(line['candidates']) for line in lines] == [3, 3]
    for line, truth in zip(lines, (40, 80)):
        assert abs(line['candidates'][0]['x'] - truth) <= 10, line['candidates'][0]


def test_eval_writes_report_plot_and_failure_strip(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report_path, plot, failures = tmp_path / 'r.json', tmp_path / 'r.png', tmp_path / 'f.png'
    assert (
        main(
            [
                'eval',
                '--dataset',
                str(data_root / 'corridor'),
                '--protocol',
                'indoor',
                '--max-queries',
                '30',
                '--map',
                str(tmp_path / 'map'),
                '--json',
                str(report_path),
                '--plot',
                str(plot),
                '--failures',
                str(failures),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert report['protocol'] == 'indoor' and report['num_queries'] == 30
    assert set(report['recall']) == {'1', '5', '10'}
    assert report['recall']['1'] >= 0.5, 'a broken pipeline would not reach this floor'
    assert {'extract', 'aggregate', 'search', 'total_median', 'total_p95'} <= set(
        report['timing_ms']
    )
    assert len(report['per_query']) == 30 and plot.stat().st_size > 0
    assert 'R@1' in capsys.readouterr().out


@pytest.mark.parametrize(
    ('argv', 'message'),
    [
        (['map', 'info', '/nonexistent/map'], 'does not exist; build one'),
        (['eval', '--dataset', '/nonexistent', '--protocol', 'x'], 'no dataset.yaml'),
        (['map', 'build', '--images', '/x', '--out', '/tmp/y'], '--images needs --poses'),
        (['localize', '--map', '/x', '--set', 'nonsense', 'a.png'], 'write KEY=VALUE'),
        (['localize', '--map', '/x', '--set', 'vlad.k=1', 'a.png'], 'unknown config key'),
        (['localize', '--map', '/x', '--radius-m', '5', 'a.png'], '--radius-m needs --near'),
        (
            ['localize', '--map', '/x', '--near', '0', '0', '--radius-m', '-5', 'a.png'],
            '--radius-m must be > 0',
        ),
        (
            [
                'map',
                'build',
                '--images',
                '/x',
                '--poses',
                '/p',
                '--image-topic',
                '/t',
                '--out',
                '/y',
            ],
            '--image-topic not used with --images',
        ),
        (
            ['map', 'build', '--bag', '/x', '--poses', '/p', '--out', '/y'],
            '--poses not used with --bag',
        ),
        (
            ['calibrate', '--map', '/m', '--dataset', '/d', '--protocol', 'p', '--tolerance', '2'],
            '--tolerance not used with --dataset',
        ),
        (
            ['calibrate', '--map', '/m', '--images', '/i', '--truth-topic', '/t', '--units', 'm'],
            '--truth-topic not used with --images',
        ),
        (
            ['calibrate', '--map', '/m', '--bag', '/b', '--split', 'fit'],
            '--split not used with --bag',
        ),
        (
            ['calibrate', '--map', '/m', '--bag', '/b'],
            '--bag needs --image-topic and --truth-topic',
        ),
        (
            [
                'calibrate',
                '--map',
                '/m',
                '--images',
                '/i',
                '--image-topic',
                '/t',
                '--truth-topic',
                '/u',
            ],
            '--image-topic, --truth-topic not used with --images',
        ),
        (
            ['calibrate', '--map', '/m', '--images', '/i', '--poses', '/p', '--odom-topic', '/o'],
            '--odom-topic not used with --images',
        ),
        (
            ['eval-bag', '/b', '--map', '/m', '--image-topic', '/t', '--truth-topic', '/u']
            + ['--odom-frame', 'odom'],
            '--odom-frame needs --odom-topic',
        ),
        (
            ['calibrate', '--map', '/m', '--bag', '/b', '--bag', '/a/../b']
            + ['--image-topic', '/t', '--truth-topic', '/u'],
            '--bag names one bag twice',
        ),
        (
            ['eval', '--dataset', '/d', '--protocol', 'p', '--sequence', '0'],
            'sequence.length must be in [1, 100]',
        ),
        (['replay', '/b', '--start-delay-s', '-1'], '--start-delay-s must be >= 0, got -1'),
        (
            ['map', 'build', '--bag', '/b', '--image-topic', '/t', '--pose-topic', '/p']
            + ['--out', '/y', '--min-distance-m', '-1'],
            '--min-distance-m and --min-rotation-deg must be >= 0, got -1 and 15',
        ),
    ],
)
def test_errors_print_one_line_and_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith('vlm-vpr: error:')


def test_localize_reports_a_corrupt_image_and_continues(
    data_root: Path, tmp_path: Path, campus_map: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\nbroken')
    good = data_root / 'campus_loop' / 'query' / 'images' / 'image_9.png'
    assert main(['localize', '--map', str(campus_map), str(bad), str(good)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 'could not decode' in lines[0]['error']
    assert lines[1]['candidates']


def test_localize_rejects_a_backbone_other_than_the_maps(
    campus_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / 'm'
    shutil.copytree(campus_map, copy)
    assert main(['localize', '--map', str(copy), '--backbone', 'dinov2', 'x.png']) == 1
    assert "built with backbone 'dense-rootsift'" in capsys.readouterr().err


def test_localize_near_a_position_searches_only_that_submap(
    campus_map: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    image = data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png'
    assert (
        main(
            [
                'localize',
                '--map',
                str(campus_map),
                '--near',
                '-31',
                '-10',
                '--radius-m',
                '15',
                str(image),
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out)
    assert 0 < len(line['candidates']) < 10
    assert all((c['x'] + 31) ** 2 + (c['y'] + 10) ** 2 <= 15**2 for c in line['candidates'])


def test_localize_in_an_unknown_region_names_the_fix(
    campus_map: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copy = tmp_path / 'm'
    shutil.copytree(campus_map, copy)
    assert main(['localize', '--map', str(copy), '--region', 'gate', 'x.png']) == 1
    assert 'run `vlm-vpr map regions` first' in capsys.readouterr().err
    assert main(['map', 'regions', str(copy), '--names', 'north,south', '--count', '2']) == 0
    capsys.readouterr()
    assert main(['localize', '--map', str(copy), '--region', 'gate', 'x.png']) == 1
    assert "no region 'gate'" in capsys.readouterr().err
    assert main(['map', 'regions', str(copy), '--names', 'east,west,gate']) == 0  # 3 regions
    regions = load_regions(read_map(copy, load_index=False))
    assert regions is not None and regions.labels == ['east', 'west', 'gate']


def test_a_config_file_that_is_not_a_mapping_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / 'list.yaml'
    config.write_text('- vlad.num_clusters: 8\n')
    assert main(['localize', '--map', '/x', '--config', str(config), 'a.png']) == 1
    assert 'is not a mapping of keys to values' in capsys.readouterr().err


def test_map_regions_rejects_count_zero_instead_of_using_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from vlm_doubles import make_map

    vpr_map = make_map(tmp_path, [(0, 0), (50, 0)])
    assert main(['map', 'regions', str(vpr_map.path), '--names', 'a,b', '--count', '0']) == 1
    assert 'region count must be >= 1, got 0' in capsys.readouterr().err


def test_map_build_settings_that_differ_from_an_existing_map_are_refused(
    campus_map: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    image = str(data_root / 'campus_loop' / 'query' / 'images' / 'image_1.png')
    built = read_map(campus_map, load_index=False).build_config.vlad.num_clusters
    localize = ['localize', '--map', str(campus_map), image, '--set']
    assert main([*localize, f'vlad.num_clusters={built * 2}']) == 1
    err = capsys.readouterr().err
    assert f'vlad.num_clusters={built * 2} (built with {built})' in err and 'new --map' in err
    assert main([*localize, f'vlad.num_clusters={built}']) == 0  # what it was built with
    assert json.loads(capsys.readouterr().out)['candidates']


def test_a_ros_params_file_gives_its_query_keys_and_names_the_node_keys_it_leaves_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / 'p.yaml'
    config.write_text(
        'vpr_node:\n  ros__parameters:\n    odom_topic: /odom\n    map_frame: map\n'
        '    sequence:\n      length: 5\n    initial_pose:\n      consecutive_frames: 1\n'
    )
    with caplog.at_level('WARNING', logger='vlm_vpr'):
        assert read_config_yaml(config) == {'sequence.length': 5}
    # odom_topic would change what a bag command measures: said; map_frame is the default
    assert "odom_topic='/odom', initial_pose.consecutive_frames=1 are not used" in caplog.text
    assert 'map_frame' not in caplog.text and '--odom-topic' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='vlm_vpr'):
        kept = read_config_yaml(config, keep_initial_pose=True)
    assert kept == {'sequence.length': 5, 'initial_pose.consecutive_frames': 1}
    assert "node parameters odom_topic='/odom' are not used" in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='vlm_vpr'):  # the shipped file: all defaults
        read_config_yaml(Path(__file__).resolve().parents[1] / 'config' / 'vpr_node.yaml')
    assert caplog.text == ''


@pytest.mark.parametrize(
    ('argv', 'usage'), [([], 'usage: vlm-vpr '), (['map'], 'usage: vlm-vpr map ')]
)
def test_a_missing_command_or_map_action_prints_that_level_s_help_and_exits_2(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith(usage) and ('ACTION' in out) == (argv == ['map'])
