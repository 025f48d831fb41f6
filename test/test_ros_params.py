"""The node's parameters: declared with descriptions and ranges, mirrored by config/vpr_node.yaml
and the launch file's parameter file, validated when set at run time (real rclpy, no map)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rclpy
import yaml
from rclpy.parameter import Parameter

from vlm_vpr.ros import params
from vlm_vpr.ros.node import VprNode

ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = ROOT / 'config' / 'vpr_node.yaml'
LAUNCH_FILE = ROOT / 'launch' / 'vpr_node.launch.py'


@pytest.fixture
def context() -> Iterator[Any]:
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)  # destroys the nodes of the context too
    context.destroy()  # now, not in a later garbage collection


def make_node(context: Any, **overrides: Any) -> VprNode:
    return VprNode(
        context=context, parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()]
    )


def yaml_keys(path: Path) -> dict[str, Any]:
    """Dotted keys of a ROS 2 parameters file (its single node entry)."""
    (entry,) = yaml.safe_load(path.read_text()).values()

    def flatten(data: dict[str, Any], prefix: str = '') -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f'{prefix}{key}.'))
            else:
                flat[prefix + key] = value
        return flat

    return flatten(entry['ros__parameters'])


def own_parameters(node: Any, context: Any) -> set[str]:
    """Parameters the node declares beyond those every rclpy node has (use_sim_time ...)."""
    plain = rclpy.create_node('plain_node', context=context)
    baseline = set(plain.list_parameters([], 0).names)
    plain.destroy_node()
    return set(node.list_parameters([], 0).names) - baseline


def load_launch_module() -> Any:
    spec = importlib.util.spec_from_file_location('vpr_node_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_params_yaml_keys_are_exactly_the_node_parameters_and_load_with_their_types(
    context: Any,
) -> None:
    node = VprNode(context=context, cli_args=['--ros-args', '--params-file', str(PARAMS_YAML)])
    declared = own_parameters(node, context)
    keys = yaml_keys(PARAMS_YAML)
    regenerate = 'regenerate it: python -m vlm_vpr.ros.params > config/vpr_node.yaml'
    assert sorted(set(keys) - declared) == [], f'yaml keys the node does not declare; {regenerate}'
    assert sorted(declared - set(keys)) == [], f'parameters missing in the yaml; {regenerate}'
    for key, value in keys.items():  # the file's values reached the node with the right types
        assert node.get_parameter(key).value == value, key
    node.destroy_node()


def test_launch_file_default_params_file_matches_the_node_parameters(context: Any) -> None:
    params_file = Path(load_launch_module().default_params_file())
    assert params_file.resolve() == PARAMS_YAML.resolve()
    node = make_node(context)
    assert set(yaml_keys(params_file)) == own_parameters(node, context)
    node.destroy_node()


def test_launch_arguments_override_the_params_file_only_when_given() -> None:
    overrides = load_launch_module().node_overrides
    assert overrides('', '', '', '') == {}  # the params file decides
    assert overrides(
        '/maps/a', '/front/image_raw, /rear/image_raw/compressed', 'false', 'true'
    ) == {
        'map_path': '/maps/a',
        'image_topics': ['/front/image_raw', '/rear/image_raw/compressed'],
        'autostart': False,
        'use_sim_time': True,
    }
    assert overrides('', '', 'true', '') == {'autostart': True}  # the launch default


def test_parameters_carry_descriptions_and_ranges(context: Any) -> None:
    node = make_node(context)
    names = [spec.name for spec in params.param_specs()]
    descriptors = dict(zip(names, node.describe_parameters(names)))
    assert all(d.description and d.description != name for name, d in descriptors.items()), (
        'every parameter needs a one-line description (a comment on its dataclass field)'
    )
    rate = descriptors['max_rate_hz'].floating_point_range[0]
    assert (rate.from_value, rate.to_value) == params.RANGES['max_rate_hz']
    frames = descriptors['initial_pose.consecutive_frames'].integer_range[0]
    assert (frames.from_value, frames.to_value) == (1, 100)
    assert 'next configure' in descriptors['map_path'].additional_constraints
    assert descriptors['max_rate_hz'].additional_constraints == ''  # applied at once
    node.destroy_node()


@pytest.mark.parametrize(
    ('name', 'value', 'reason'),
    [
        ('max_rate_hz', 1000.0, 'out of range'),
        ('initial_pose.consecutive_frames', 0, 'out of range'),
        ('fusion.top_n', 0, 'fusion.top_n must be >= 1'),
        ('mode', 'sometimes', 'mode must be one of'),
        ('rerank.chain', 'no-such-reranker,geometric', None),  # valid for the config: a list
        ('image_topics', [''], 'image_topics must name at least one topic'),
        ('image_topics', ['front camera/image'], "'front camera/image' is not a valid ROS topic"),
        ('image_topics', ['/front/image_raw/'], 'is not a valid ROS topic name'),
        ('image_topics', ['image', '/image'], 'names a topic twice'),
        ('odom_topic', 'odom topic', "odom_topic: 'odom topic' is not a valid ROS topic name"),
        ('fusion.unknown_yaw_std_rad', float('nan'), 'must be a finite number, got nan'),
        ('confidence.initial_pose_threshold', 0.0, 'initial_pose_threshold must be in'),
    ],
)
def test_setting_a_parameter_validates_it(
    context: Any, name: str, value: Any, reason: str | None
) -> None:
    node = make_node(context)
    before = node.get_parameter(name).value
    (result,) = node.set_parameters([Parameter(name, value=value)])
    if reason is None:
        assert result.successful
        assert node.settings[1].rerank.chain == ('no-such-reranker', 'geometric')
    else:
        assert not result.successful
        assert reason in result.reason
        assert node.get_parameter(name).value == before
    node.destroy_node()


def test_diagnostics_say_the_node_is_shut_down(context: Any) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = make_node(context)
    assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
    level, text = node.status
    assert level == b'\x01' and text.startswith('shut down')  # WARN, not OK 'localising'
    node.destroy_node()


def test_odom_topic_and_odom_frame_exclude_each_other(context: Any) -> None:
    node = make_node(context, odom_topic='odom')
    (result,) = node.set_parameters([Parameter('odom_frame', value='odom')])
    assert not result.successful
    assert 'set odom_topic or odom_frame (the motion from one source), not both' in result.reason
    (result,) = node.set_parameters([Parameter('odom_topic', value='')])
    assert result.successful
    (result,) = node.set_parameters([Parameter('odom_frame', value='base_link')])
    assert not result.successful and 'odom_frame must differ from base_frame' in result.reason
    (result,) = node.set_parameters([Parameter('odom_frame', value='odom')])
    assert result.successful and node.settings[0].odom_frame == 'odom'
    node.destroy_node()


def test_live_thresholds_change_the_running_settings(context: Any) -> None:
    node = make_node(context)
    results = node.set_parameters(
        [
            Parameter('initial_pose.max_distance_m', value=2.5),
            Parameter('confidence.initial_pose_threshold', value=0.6),
            Parameter('camera_offset.yaw_deg', value=90.0),
        ]
    )
    assert all(r.successful for r in results)
    node_config, query_config = node.settings
    assert node_config.initial_pose.max_distance_m == 2.5
    assert node_config.camera_offset.yaw_deg == 90.0
    assert query_config.confidence.initial_pose_threshold == 0.6
    node.destroy_node()


@pytest.mark.parametrize(
    ('map_path', 'message'),
    [
        ('', 'map_path is empty'),
        ('/nonexistent/map', '/nonexistent/map does not exist'),
    ],
)
def test_configure_fails_cleanly_without_a_usable_map(
    context: Any, map_path: str, message: str
) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = make_node(context, map_path=map_path)
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    level, text = node.status
    assert level == b'\x02'  # DiagnosticStatus.ERROR
    assert text.startswith('configure failed') and message in text
    assert node.trigger_activate() != TransitionCallbackReturn.SUCCESS  # still unconfigured
    node.destroy_node()


def test_configure_fails_cleanly_with_an_incompatible_map(context: Any, tmp_path: Path) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    (tmp_path / 'manifest.json').write_text('{"format": "vlm_vpr.map", "format_version": 999}')
    node = make_node(context, map_path=str(tmp_path))
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    level, text = node.status
    assert level == b'\x02' and 'map format version 999 is not supported' in text
    node.destroy_node()


def test_console_script_exits_with_a_message_on_a_bad_parameter() -> None:
    script = Path(sys.executable).with_name('vpr_node')
    run = subprocess.run(
        [str(script), '--ros-args', '-p', 'max_rate_hz:=1000.0'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert 'max_rate_hz' in run.stdout + run.stderr
