# `make demo` and `make test` each do all set-up first (tools/setup.sh, idempotent).
VENV := .venv
ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

.PHONY: setup demo test test-fast lint clean

setup:
	@bash tools/setup.sh

demo: setup
	@$(ENV) $(VENV)/bin/sage chat

lint: setup
	@$(VENV)/bin/python -m mypy

test: lint
	@$(ENV) $(VENV)/bin/python -m pytest

test-fast: setup
	@$(ENV) $(VENV)/bin/python -m pytest -m "not slow and not graph"

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache
