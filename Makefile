# Every target installs what it needs into .venv on first use.
#   make deploy MANIFEST=manifests/phi35.yaml   build, register, smoke-test and roll out a manifest
#   make demo       the same, offline: a tiny Phi-3 + SO8T adapter deployed to two local
#                   Ollama-compatible test servers (there is no Ollama binary on these machines)
#   make test       the test suite (CPU torch pinned, as CI runs it)
#   make image      the worker image for runtime.backend: docker, built here without any registry
#                   (a debootstrapped Debian base, the host's wheelhouse, CPU torch): what CI tests
#   make lint       ruff and mypy
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Real users get PyPI's normal torch; tests and CI pin the CPU build that this project verified.
TORCH_SPEC ?= torch
TEST_TORCH_SPEC := torch==2.13.0
DEMO_DIR := .so8t/demo
CACHE_DIR ?= .so8t/cache

# llama.cpp comes pinned inside llama-cpp-python. A native build enables CPU kernels (AMX) that
# crash on quantized models in some VMs, so it is always built portable, once, into a wheel.
LLAMA_VERSION := $(shell sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"/\1/p' so8t_deploy/external/llamacpp.py)
LLAMA_SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_WHEEL_DIR := .cache/wheels
LLAMA_WHEEL_STAMP := $(LLAMA_WHEEL_DIR)/.llama-cpp-python-$(LLAMA_VERSION).built
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
# The converter is extracted from the same sdist; the cache keeps it (and hashes) between runs.
export SO8T_LLAMA_CPP_SDIST := $(abspath $(LLAMA_SDIST))
export SO8T_CACHE_DIR ?= $(abspath .cache/so8t)

WHEELHOUSE := .cache/wheelhouse
BASE_IMAGE := so8t-base:bookworm
TEST_IMAGE := so8t-deploy-worker:test

.PHONY: test lint demo deploy wheelhouse image clean go-toolchain

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(LLAMA_SDIST): | $(VENV)/bin/python
	$(PIP) download -q --no-deps --no-binary :all: -d $(@D) llama-cpp-python==$(LLAMA_VERSION)

$(LLAMA_WHEEL_STAMP): $(LLAMA_SDIST)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEEL_DIR) $(LLAMA_SDIST)
	touch $@

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL_STAMP)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install -q -e ".[bake,dev]"
	touch $@

# The Ollama test server renders templates with Go's own text/template (tests/gotemplate).
go-toolchain:
	@command -v go >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null; }; }; } \
	  || { echo "the Ollama test server needs Go: install Debian's golang-go" >&2; exit 1; }

test: TORCH_SPEC := $(TEST_TORCH_SPEC)
test: $(VENV)/.installed go-toolchain
	$(PY) -m pytest

# Every wheel the worker image needs, at the versions installed here (so both backends produce
# the same bytes), plus the llama.cpp sdist the converter is extracted from. Its wheels of the base
# dependencies also install the torchless control plane that tests/test_docker.py drives.
# setuptools' build/ is removed first: a module deleted from the source would stay in the wheel.
wheelhouse: TORCH_SPEC := $(TEST_TORCH_SPEC)
wheelhouse: $(VENV)/.installed
	rm -rf $(WHEELHOUSE) build && mkdir -p $(WHEELHOUSE)
	$(PIP) freeze --exclude-editable > .cache/constraints.txt
	$(PIP) wheel -q -w $(WHEELHOUSE) --find-links $(LLAMA_WHEEL_DIR) -c .cache/constraints.txt \
		"$(TEST_TORCH_SPEC)" ".[bake]"
	cp $(LLAMA_SDIST) $(WHEELHOUSE)/

image: TORCH_SPEC := $(TEST_TORCH_SPEC)
image: wheelhouse
	docker/make-base-image.sh $(BASE_IMAGE)
	$(VENV)/bin/so8t-deploy image build --tag $(TEST_IMAGE) --wheelhouse $(WHEELHOUSE) \
		--build-arg BUILD_IMAGE=$(BASE_IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_SPEC=$(TEST_TORCH_SPEC) --build-arg OFFLINE=1

lint: $(VENV)/.installed
	$(PY) -m ruff check so8t_deploy tests benchmarks
	$(PY) -m mypy

$(DEMO_DIR)/manifest.yaml: | $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/so8t-deploy demo init $(DEMO_DIR)

deploy: $(VENV)/.installed
	@test -n "$(MANIFEST)" || { echo "usage: make deploy MANIFEST=path/to/manifest.yaml" >&2; exit 2; }
	$(VENV)/bin/so8t-deploy apply "$(MANIFEST)" --cache-dir "$(CACHE_DIR)"

demo: $(DEMO_DIR)/manifest.yaml go-toolchain
	$(PY) -m tests.demo_hosts $(VENV)/bin/so8t-deploy apply manifests/demo.yaml --cache-dir "$(CACHE_DIR)"

clean:
	rm -rf $(VENV) .so8t .pytest_cache .ruff_cache
