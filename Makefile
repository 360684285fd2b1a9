# `make demo` and `make test` each do all set-up first (tools/setup.sh, idempotent).
VENV := .venv
ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

.PHONY: setup ros2-tools demo test test-fast test-robot lint clean

setup:
	@bash tools/setup.sh

# setup + the ROS 2 command line, launch and colcon in the venv (for the robot tests).
ros2-tools:
	@bash tools/setup.sh --ros2-tools

demo: setup
	@$(ENV) $(VENV)/bin/sage chat

lint: ros2-tools
	@$(VENV)/bin/python -m mypy

test: lint
	@$(ENV) $(VENV)/bin/python -m pytest

test-fast: setup
	@$(ENV) $(VENV)/bin/python -m pytest -m "not slow and not graph and not robot"

# colcon build + `ros2 launch|topic|param|lifecycle|action` against the graph (test/robot/).
test-robot: ros2-tools
	@$(ENV) $(VENV)/bin/python -m pytest -m robot

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache
