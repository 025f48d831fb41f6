"""The node's ROS parameters: its own settings (NodeConfig) plus every LocalizerConfig key.

Names, defaults and descriptions come from frozen dataclasses, the single source of truth:
:class:`NodeConfig` here and :class:`vlm_vpr.core.config.LocalizerConfig`; the one-line
comment of each field is its ROS description. ``config/vpr_node.yaml`` mirrors them (a test
keeps both in sync). Node settings carry ranges in their descriptors; LocalizerConfig values
are validated by the dataclass itself when a parameter is set.

Tuple fields are string arrays, except that ROS cannot hold an empty typed array, so a tuple
field whose default is empty (``rerank.chain``) is a comma-separated string ('' = none).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from vlm_vpr.core.config import LocalizerConfig, from_flat_dict, to_flat_dict
from vlm_vpr.core.errors import ConfigError
from vlm_vpr.core.initial_pose import InitialPoseConfig

MODES = ('continuous', 'on_demand')


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class CameraOffsetConfig:
    """Pose of the camera in base_frame (the TF base_frame -> camera), used without TF."""

    x_m: float = 0.0  # forward of the base origin
    y_m: float = 0.0  # left of the base origin
    z_m: float = 0.0  # above the base origin
    yaw_deg: float = 0.0  # camera heading relative to the base heading (counter-clockwise)

    def __post_init__(self) -> None:
        _check(
            all(math.isfinite(v) for v in (self.x_m, self.y_m, self.z_m, self.yaw_deg)),
            'camera_offset.* must be finite numbers',
        )


@dataclass(frozen=True)
class NodeConfig:
    """Settings of the ROS node itself (the localisation settings are LocalizerConfig)."""

    map_path: str = ''  # map folder written by `vlm-vpr map build` (required)
    image_topics: tuple[str, ...] = ('image',)  # camera topics; '.../compressed' = CompressedImage
    map_frame: str = 'map'  # frame id of published poses (the map's frame)
    base_frame: str = 'base_link'  # robot frame whose pose is published
    autostart: bool = False  # configure and activate at start-up (no lifecycle manager)
    mode: str = 'continuous'  # 'continuous', or 'on_demand' (only for `relocalize` calls)
    max_rate_hz: float = 2.0  # batches per second at most (the newest frame of each camera)
    min_confidence: float = 0.0  # `pose` is published only at or above this confidence
    use_tf: bool = False  # camera mount from TF (tf2_ros) instead of camera_offset.*
    camera_frame: str = ''  # TF frame of the camera (x forward); '' = the image's frame_id
    use_camera_info: bool = False  # rectify frames with each camera's sibling camera_info
    odom_topic: str = ''  # nav_msgs/Odometry for sequence evidence; '' = by frame order
    odom_frame: str = ''  # or the motion from TF odom_frame -> base_frame (tf2_ros); '' = none
    relocalize_frames: int = 3  # frames the `relocalize` service waits for
    relocalize_timeout_s: float = 15.0  # `relocalize` gives up after this long
    debug_image: bool = False  # publish `debug_image`: the query beside its best match
    diagnostics_period_s: float = 1.0  # /diagnostics publishing period
    initial_pose: InitialPoseConfig = field(default_factory=InitialPoseConfig)
    camera_offset: CameraOffsetConfig = field(default_factory=CameraOffsetConfig)

    def __post_init__(self) -> None:
        _check(
            len(self.image_topics) >= 1 and all(self.image_topics),
            'image_topics must name at least one topic',
        )
        for name, topic in [
            *(('image_topics', t) for t in self.image_topics),
            ('odom_topic', self.odom_topic),
        ]:
            _check(
                not topic or _TOPIC_NAME.fullmatch(topic) is not None,
                f'{name}: {topic!r} is not a valid ROS topic name (letters, digits and _ in '
                "tokens that do not start with a digit, joined by '/'; no trailing '/')",
            )
        stripped = [t.lstrip('/') for t in self.image_topics]
        _check(
            len(set(stripped)) == len(stripped),
            f'image_topics names a topic twice ({list(self.image_topics)}): each frame would '
            'count twice, also for the /initialpose gate',
        )
        _check(
            bool(self.map_frame) and bool(self.base_frame),
            'map_frame and base_frame must not be empty',
        )
        _check(self.mode in MODES, f'mode must be one of {MODES}')
        _check(
            not (self.odom_topic and self.odom_frame),
            'set odom_topic or odom_frame (the motion from one source), not both',
        )
        _check(
            self.odom_frame != self.base_frame,
            'odom_frame must differ from base_frame: it is the frame the robot moves in (odom)',
        )
        _check(0.01 <= self.max_rate_hz <= 100, 'max_rate_hz must be in [0.01, 100]')
        _check(0 <= self.min_confidence <= 1, 'min_confidence must be in [0, 1]')
        _check(1 <= self.relocalize_frames <= 100, 'relocalize_frames must be in [1, 100]')
        _check(self.relocalize_timeout_s > 0, 'relocalize_timeout_s must be > 0')
        _check(0.1 <= self.diagnostics_period_s <= 60, 'diagnostics_period_s must be in [0.1, 60]')


# A ROS 2 topic name (rcl's rules): tokens of letters, digits and '_' (not starting with a
# digit; {substitutions} allowed) joined by '/', optionally starting with '/' or '~/'.
_TOKEN = r'[A-Za-z_{][A-Za-z0-9_{}]*'
_TOPIC_NAME = re.compile(rf'~|(~/|/)?{_TOKEN}(/{_TOKEN})*')

# Ranges shown to ROS tools and enforced by rclpy (the dataclasses check them too).
RANGES: dict[str, tuple[float, float]] = {
    'max_rate_hz': (0.01, 100.0),
    'min_confidence': (0.0, 1.0),
    'relocalize_frames': (1, 100),
    'relocalize_timeout_s': (0.1, 600.0),
    'diagnostics_period_s': (0.1, 60.0),
    'initial_pose.consecutive_frames': (1, 100),
    'initial_pose.max_distance_m': (0.01, 1000.0),
    'initial_pose.max_yaw_deg': (0.1, 180.0),
    'camera_offset.yaw_deg': (-180.0, 180.0),
}

# Read once, when the node starts: read-only afterwards (set them with --ros-args -p or a file).
START_UP = frozenset({'autostart'})
# Applied at once while the node runs; every other parameter takes effect at the next configure.
LIVE = frozenset(
    {
        'mode',
        'max_rate_hz',
        'min_confidence',
        'relocalize_frames',
        'relocalize_timeout_s',
        'debug_image',
        'initial_pose.enabled',
        'initial_pose.consecutive_frames',
        'initial_pose.max_distance_m',
        'initial_pose.max_yaw_deg',
        'confidence.initial_pose_threshold',
        'camera_offset.x_m',
        'camera_offset.y_m',
        'camera_offset.z_m',
        'camera_offset.yaw_deg',
    }
)


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter: dotted name, default (ROS-typed), description, optional range."""

    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None


@cache
def param_specs() -> tuple[ParamSpec, ...]:
    """Every parameter of the node: NodeConfig's, then LocalizerConfig's."""
    specs = []
    for config in (NodeConfig(), LocalizerConfig()):
        comments = _field_comments(type(config))
        for name, value in to_flat_dict(config).items():
            if isinstance(value, list) and not value:
                value = ''  # an empty tuple field: comma-separated string
            specs.append(ParamSpec(name, value, comments.get(name, name), RANGES.get(name)))
    return tuple(specs)


def split_values(values: dict[str, Any]) -> tuple[NodeConfig, LocalizerConfig]:
    """Validated (NodeConfig, LocalizerConfig) from ``{dotted name: value}``; ConfigError."""
    node_keys = set(to_flat_dict(NodeConfig()))
    node = from_flat_dict(NodeConfig, {k: v for k, v in values.items() if k in node_keys})
    query = from_flat_dict(
        LocalizerConfig, {k: v for k, v in values.items() if k not in node_keys}
    )
    return node, query


def _field_comments(cls: type) -> dict[str, str]:
    """``{dotted field name: its trailing '# comment'}`` for a (nested) config dataclass."""
    pattern = re.compile(r'^\s+(\w+):[^#]*#\s*(.+)$')
    own = {
        m.group(1): m.group(2).strip()
        for m in map(pattern.match, inspect.getsource(cls).splitlines())
        if m
    }
    comments: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):
            comments.update(
                {f'{f.name}.{k}': v for k, v in _field_comments(type(default)).items()}
            )
        elif f.name in own:
            comments[f.name] = own[f.name]
    return comments


def declare(node: Any) -> None:
    """Declare every parameter on ``node`` (an rclpy Node) with description and range."""
    for spec in param_specs():
        node.declare_parameter(spec.name, spec.default, _descriptor(spec))


def current_values(node: Any) -> dict[str, Any]:
    """``{dotted name: value}`` of every declared parameter."""
    return {spec.name: node.get_parameter(spec.name).value for spec in param_specs()}


def _descriptor(spec: ParamSpec) -> Any:
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    descriptor = ParameterDescriptor(name=spec.name, description=spec.description)
    if spec.name in START_UP:
        descriptor.read_only = True
        descriptor.additional_constraints = 'read at start-up'
    elif spec.name not in LIVE:
        descriptor.additional_constraints = 'read at configure: applies at the next configure'
    if spec.range is not None:
        low, high = spec.range
        if isinstance(spec.default, int):
            descriptor.integer_range = [
                IntegerRange(from_value=int(low), to_value=int(high), step=1)
            ]
        else:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)
            ]
    return descriptor


def render_params_yaml() -> str:
    """config/vpr_node.yaml: every parameter with its default, description and range.

    Regenerate after a config change: ``python -m vlm_vpr.ros.params > config/vpr_node.yaml``.
    """
    lines = [
        '# Parameters of vpr_node. Every key is a declared ROS parameter and every declared '
        'parameter',
        "# is here (test/test_ros_params.py checks both ways): the node's own settings, then",
        '# vlm_vpr.core.config.LocalizerConfig. Regenerate with',
        '#   python -m vlm_vpr.ros.params > config/vpr_node.yaml',
        '/**:',
        '  ros__parameters:',
    ]
    groups: list[str] = []
    for spec in param_specs():
        *path, key = spec.name.split('.')
        common = next(
            (i for i, (a, b) in enumerate(zip(groups, path)) if a != b),
            min(len(groups), len(path)),
        )
        lines += [f'    {"  " * i}{name}:' for i, name in enumerate(path) if i >= common]
        groups = path
        indent = '    ' + '  ' * len(path)
        bounds = f' [{spec.range[0]:g}, {spec.range[1]:g}]' if spec.range else ''
        entry, comment = f'{indent}{key}: {_yaml_value(spec.default)}', spec.description + bounds
        if len(entry) + len(comment) + 4 > 99:
            lines += [f'{indent}# {comment}', entry]
        else:
            lines.append(f'{entry}  # {comment}')
    return '\n'.join(lines) + '\n'


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    return repr(value)


if __name__ == '__main__':
    print(render_params_yaml(), end='')
