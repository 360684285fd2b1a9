"""Hearing and seeing without ROS: audio and image decoding, voice activity, motion and
features for salience, and the runners of the speech, vision and omni model kinds."""
