"""Build a `ros2 launch` description of a profile from `sage_ros.graph`.

Imported only by the launch files: `launch` and `launch_ros` exist on a ROS install, not on PyPI.
"""

from __future__ import annotations

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from . import names
from .graph import PACKAGE, PROFILES, params_path


def profile_launch_description(profile_name: str) -> LaunchDescription:
    profile = PROFILES[profile_name]
    namespace = LaunchConfiguration('namespace')
    params_file = LaunchConfiguration('params_file')
    actions = [
        DeclareLaunchArgument('namespace', default_value=names.DEFAULT_NAMESPACE,
                              description='Namespace of every SAGE node, topic and action'),
        DeclareLaunchArgument('params_file', default_value=str(params_path(profile)),
                              description='ROS parameters for all SAGE nodes'),
    ]
    for spec in profile.nodes:
        node_type = LifecycleNode if spec.lifecycle else Node
        actions.append(node_type(package=PACKAGE, executable=spec.executable, name=spec.name,
                                 namespace=namespace, parameters=[params_file], output='screen',
                                 emulate_tty=True))
    return LaunchDescription(actions)
