"""Start vpr_node (a lifecycle node) with the package's parameter file.

    ros2 launch vlm_vpr vpr_node.launch.py map:=/path/to/map
    ros2 launch vlm_vpr vpr_node.launch.py map:=/path/to/map \\
        camera_topics:=/front/image_raw,/rear/image_raw/compressed use_sim_time:=true

With ``autostart:=true`` (the default) the node configures and activates itself; with
``autostart:=false`` a lifecycle manager (e.g. nav2_lifecycle_manager) drives it. ``map``,
``camera_topics`` and ``use_sim_time`` override the parameters file only when given.
launch / launch_ros are imported inside generate_launch_description only, so the parameter
file path and the overrides can be read (and tested) where they are not installed.
"""

from __future__ import annotations

from pathlib import Path


def default_params_file() -> str:
    """config/vpr_node.yaml beside this launch folder (in the source tree and in the installed
    share/vlm_vpr folder alike)."""
    return str(Path(__file__).parent.parent / 'config' / 'vpr_node.yaml')


def node_overrides(map_path: str, camera_topics: str, autostart: str, use_sim_time: str) -> dict:
    """Parameters that the launch arguments set over the parameters file ('' = not given)."""

    def flag(text: str) -> bool:
        return text.strip().lower() in ('true', '1', 'yes')

    overrides = {}
    if map_path:
        overrides['map_path'] = map_path
    topics = [t.strip() for t in camera_topics.split(',') if t.strip()]
    if topics:
        overrides['image_topics'] = topics
    if autostart:
        overrides['autostart'] = flag(autostart)
    if use_sim_time:
        overrides['use_sim_time'] = flag(use_sim_time)
    return overrides


def generate_launch_description():
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode

    from launch import LaunchDescription

    def create_node(context, *args, **kwargs):
        def value(name: str) -> str:
            return LaunchConfiguration(name).perform(context)

        overrides = node_overrides(
            value('map'), value('camera_topics'), value('autostart'), value('use_sim_time')
        )
        return [
            LifecycleNode(
                package='vlm_vpr',
                executable='vpr_node',
                name='vpr_node',
                namespace=value('namespace'),
                output='screen',
                parameters=[value('params_file'), overrides],
            )
        ]

    return LaunchDescription(
        [
            DeclareLaunchArgument(
                'map',
                default_value='',
                description='map folder built by `vlm-vpr map build` (overrides '
                'map_path of the params file)',
            ),
            DeclareLaunchArgument(
                'params_file',
                default_value=default_params_file(),
                description='ROS parameters file of vpr_node',
            ),
            DeclareLaunchArgument(
                'camera_topics',
                default_value='',
                description='camera topic, or several separated by commas; a '
                'name ending in /compressed is read as CompressedImage '
                '(default: image_topics of the params file)',
            ),
            DeclareLaunchArgument(
                'use_sim_time',
                default_value='',
                description='use /clock (bag replay, simulation); default: the '
                "params file's, else false",
            ),
            DeclareLaunchArgument(
                'autostart',
                default_value='true',
                description='configure and activate the lifecycle node at once',
            ),
            DeclareLaunchArgument('namespace', default_value='', description='node namespace'),
            OpaqueFunction(function=create_node),
        ]
    )
