"""The `sage` command: chat, up, models."""
