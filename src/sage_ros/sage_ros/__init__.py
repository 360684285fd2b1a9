"""SAGE cognition kernel as a ROS 2 node graph.

`sage_ros.core` holds the ROS-free logic; `sage_ros.nodes` the thin rclpy nodes over it;
`sage_ros.graph` the one description of which nodes make up a running graph.
"""

import os as _os

# The model manager reports load progress itself (bytes and shards, on `models/status` and the
# swap action's feedback); transformers' own bar would only clutter the console and the logs.
_os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
