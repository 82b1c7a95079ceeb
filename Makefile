# Every target installs what it needs into .venv on first use.
#   make test                       the test suite (CPU torch pinned, as CI runs it)
#   make demo                       offline demo: tiny Phi-3 + SO8T adapter, planned end to end
#   make lint                       ruff
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Real users get PyPI's normal torch; tests and CI pin the CPU build that this project verified.
TORCH_SPEC ?= torch
TEST_TORCH_SPEC := torch==2.13.0
DEMO_DIR := .so8t/demo

.PHONY: test lint demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[bake,dev]"
	touch $@

test: TORCH_SPEC := $(TEST_TORCH_SPEC)
test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check so8t_deploy tests benchmarks

$(DEMO_DIR)/manifest.yaml: | $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/so8t-deploy demo init $(DEMO_DIR)

demo: $(DEMO_DIR)/manifest.yaml
	$(VENV)/bin/so8t-deploy validate manifests/demo.yaml
	$(VENV)/bin/so8t-deploy plan manifests/demo.yaml --offline

clean:
	rm -rf $(VENV) .so8t .pytest_cache .ruff_cache
