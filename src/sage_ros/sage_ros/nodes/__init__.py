"""Thin rclpy nodes: parameters, entities, message conversion and logging over `sage_ros.core`."""
