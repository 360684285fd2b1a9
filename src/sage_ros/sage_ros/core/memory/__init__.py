"""The robot's long-term memory (ROS-free): one SQLite file with sessions, the turn journal,
memories with embeddings and dreams (store.py, schema.py), a vector index derived from it
(index.py), and the consolidation, awakening and sleep-training logic built on it."""
