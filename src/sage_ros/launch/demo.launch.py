"""SAGE with the offline demo models: `ros2 launch sage_ros demo.launch.py`.

The nodes come from `sage_ros.graph.PROFILES['demo']`, the same list `sage up --profile demo` runs.
"""

from launch import LaunchDescription

from sage_ros.launch_description import profile_launch_description


def generate_launch_description() -> LaunchDescription:
    return profile_launch_description('demo')
