"""SAGE cognition kernel as a ROS 2 node graph.

`sage_ros.core` holds the ROS-free logic; `sage_ros.nodes` the thin rclpy nodes over it;
`sage_ros.graph` the one description of which nodes make up a running graph.
"""
