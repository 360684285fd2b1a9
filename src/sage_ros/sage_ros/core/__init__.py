"""ROS-free core of SAGE: salience, energy, routing, conversation and models.

Nothing under this package imports rclpy or ROS messages, so it is unit-tested without a
middleware and reusable outside ROS.
"""
