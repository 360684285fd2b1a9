"""SAGE on Jetson AGX Thor: `ros2 launch sage_ros thor.launch.py [namespace:=/sage] [params_file:=...]`.

The nodes come from `sage_ros.graph.PROFILES['thor']`, the same list `sage up --profile thor` runs.
"""

from launch import LaunchDescription

from sage_ros.launch_description import profile_launch_description


def generate_launch_description() -> LaunchDescription:
    return profile_launch_description('thor')
