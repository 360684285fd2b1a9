"""SAGE on Sprout (Jetson Orin Nano): `ros2 launch sage_ros sprout.launch.py`.

The nodes come from `sage_ros.graph.PROFILES['sprout']`, the same list `sage up --profile sprout` runs.
"""

from launch import LaunchDescription

from sage_ros.launch_description import profile_launch_description


def generate_launch_description() -> LaunchDescription:
    return profile_launch_description('sprout')
