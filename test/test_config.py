"""Config dataclasses: validation, dotted keys, and the core's import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlm_vpr.core.config import (
    FeatureConfig,
    LocalizerConfig,
    MapBuildConfig,
    VladConfig,
    from_flat_dict,
    to_flat_dict,
)
from vlm_vpr.core.errors import ConfigError


def test_flat_dict_round_trip_restores_nested_config() -> None:
    config = MapBuildConfig(
        vlad=VladConfig(num_clusters=32), features=FeatureConfig(rootsift_cell_px=(4, 8))
    )
    flat = to_flat_dict(config)
    assert flat['vlad.num_clusters'] == 32
    assert flat['features.rootsift_cell_px'] == [4, 8]
    assert from_flat_dict(MapBuildConfig, flat) == config


def test_unknown_key_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['vlad.clusters'\]"):
        from_flat_dict(MapBuildConfig, {'vlad.clusters': 3})


@pytest.mark.parametrize(
    ('key', 'value', 'message'),
    [
        ('vlad.num_clusters', 1, 'num_clusters must be in'),
        ('vlad.num_clusters', 'many', 'must be an integer'),
        ('features.backbone', 'resnet', 'backbone must be one of'),
        ('features.dinov2_layer', 0, '1-based'),
        ('vlad.soft_assignment', 'yes', 'true or false'),
        ('vlad.temperature', 0, 'temperature must be in'),
    ],
)
def test_invalid_values_raise_config_error(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_flat_dict(MapBuildConfig, {key: value})


@pytest.mark.parametrize(
    ('key', 'value', 'message'),
    [
        ('fusion.unknown_yaw_std_rad', float('nan'), 'must be a finite number, got nan'),
        ('fusion.min_std_xy_m', float('inf'), 'must be a finite number, got inf'),
        ('sequence.max_gap_spacings', float('inf'), 'must be a finite number'),
        ('fusion.unknown_yaw_std_rad', -1.0, 'unknown_yaw_std_rad must be > 0'),
    ],
)
def test_non_finite_or_negative_query_settings_are_refused(
    key: str, value: object, message: str
) -> None:
    """Accepted before; fusion.unknown_yaw_std_rad=nan made every frame's covariance NaN
    (skipped as invalid_output)."""
    with pytest.raises(ConfigError, match=message):
        from_flat_dict(LocalizerConfig, {key: value})


def test_section_given_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match='is a section'):
        from_flat_dict(LocalizerConfig, {'fusion': 3})


def test_list_values_accept_comma_separated_strings() -> None:
    config = from_flat_dict(LocalizerConfig, {'rerank.chain': 'geometric, consensus'})
    assert config.rerank.chain == ('geometric', 'consensus')


@pytest.mark.parametrize(
    ('cls', 'key', 'value', 'expected'),
    [
        (MapBuildConfig, 'features.rootsift_cell_px', '4,6', (4, 6)),  # --set key=4,6
        (MapBuildConfig, 'features.rootsift_cell_px', ['4', ' 6 '], (4, 6)),
        (MapBuildConfig, 'features.rootsift_cell_px', [4.0, 6], (4, 6)),
        (LocalizerConfig, 'sequence.velocities', '0.8 1', (0.8, 1.0)),
        (LocalizerConfig, 'sequence.velocities', [1, '-1.5'], (1.0, -1.5)),
        (LocalizerConfig, 'rerank.chain', ['geometric'], ('geometric',)),
    ],
)
def test_list_elements_get_the_type_of_the_setting(
    cls: type, key: str, value: object, expected: tuple
) -> None:
    section, name = key.split('.')
    got = getattr(getattr(from_flat_dict(cls, {key: value}), section), name)
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]


@pytest.mark.parametrize(
    ('cls', 'key', 'value'),
    [
        (MapBuildConfig, 'features.rootsift_cell_px', [4.5, 6]),
        (MapBuildConfig, 'features.rootsift_cell_px', '4,six'),
        (MapBuildConfig, 'features.rootsift_cell_px', '4.5'),
        (MapBuildConfig, 'features.rootsift_cell_px', [True, 6]),
        (LocalizerConfig, 'sequence.velocities', '0.8 0'),  # a string zero is still zero
        (LocalizerConfig, 'sequence.velocities', '1 fast'),
        (LocalizerConfig, 'sequence.velocities', [1.0, float('nan')]),
        (LocalizerConfig, 'sequence.velocities', [1.0, 10**400]),  # beyond float range
        (LocalizerConfig, 'rerank.chain', [1, 2]),
    ],
)
def test_bad_list_elements_raise_config_error_naming_the_key(
    cls: type, key: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        from_flat_dict(cls, {key: value})


def test_importing_core_loads_no_ros_and_no_heavy_libraries() -> None:
    code = (
        'import sys, vlm_vpr.core.localizer, vlm_vpr.core.evaluation, vlm_vpr.core.bags, '
        'vlm_vpr.core.map_build, vlm_vpr.core.confidence;'
        "bad = [m for m in ('rclpy', 'sensor_msgs', 'torch', 'transformers', 'faiss') "
        'if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)'
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
