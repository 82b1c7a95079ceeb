# Every target installs what it needs into .venv on first use.
#   make deploy MANIFEST=manifests/phi35.yaml   build, register, smoke-test and roll out a manifest
#   make demo       the same, offline: a tiny Phi-3 + SO8T adapter deployed to two local
#                   Ollama-compatible test servers (there is no Ollama binary on these machines);
#                   FAMILY=qwen3 (gemma2, llama3.1, ...) deploys a tiny model of that chat family instead
#   make demo-hosts those two test servers on 127.0.0.1:11534 and :11535 until Ctrl-C, to try
#                   plan and apply by hand (README: "The first hour")
#   make test       the test suite (CPU torch pinned, as CI runs it), on every core (pytest-xdist)
#   make test-fast  the tests that need no llama.cpp build, no Docker and no slow model loads: under 2 min
#   make image      the worker image for runtime.backend: docker, built here without any registry
#                   (a debootstrapped Debian base, the host's wheelhouse, CPU torch): what CI tests
#   make lint       ruff and mypy
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Real users get PyPI's normal torch (`make deploy`). Every other target pins the CPU build this
# project verified, as CI does: the demo runs on this machine's CPU and needs no multi-GB CUDA build.
TORCH_SPEC ?= torch
TEST_TORCH_SPEC := torch==2.13.0
FAMILY ?=
DEMO_DIR := .so8t/demo$(if $(FAMILY),-$(FAMILY))
CACHE_DIR ?= .so8t/cache

# llama.cpp comes pinned inside llama-cpp-python. A native build enables CPU kernels (AMX) that
# crash on quantized models in some VMs, so it is always built portable, once per user and set of
# CMAKE_ARGS, into a wheel cache that `make clean` and fresh clones keep (scripts/build_llama_wheel.py).
LLAMA_VERSION := $(shell sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"/\1/p' so8t_deploy/external/llamacpp.py)
LLAMA_SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/so8t-deploy/wheels
LLAMA_BUILD_KEY := $(shell printf '%s %s' "$$(uname -m)" '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
LLAMA_WHEEL_DIR := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_BUILD_KEY)
# The converter is extracted from the same sdist; the cache keeps it (and hashes) between runs.
export SO8T_LLAMA_CPP_SDIST := $(abspath $(LLAMA_SDIST))
export SO8T_CACHE_DIR ?= $(abspath .cache/so8t)

WHEELHOUSE := .cache/wheelhouse
BASE_IMAGE := so8t-base:bookworm
TEST_IMAGE := so8t-deploy-worker:test

.PHONY: test test-fast lint demo demo-hosts deploy wheelhouse image clean go-toolchain test-tools apt-install FORCE

# A venv whose torch does not fit the target's TORCH_SPEC (scripts/torch_fits.py) is recreated, not
# patched, so no CUDA libraries of an earlier `make deploy` linger under the tests (with pip's cache
# and the llama.cpp wheel cache warm, that took 2.1 to 2.7 min here; README: "The first hour"). Any torch
# fits `make deploy`'s spec, so it keeps a pinned one. $(VENV)/.torch-spec names the spec the venv
# was made for; it changes only with the venv, which is when .installed runs again.
$(VENV)/.torch-spec: FORCE
	@if [ -x $(PY) ] && ! $(PY) scripts/torch_fits.py '$(TORCH_SPEC)'; then \
	  echo "recreating $(VENV) for $(TORCH_SPEC)"; rm -rf $(VENV); \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@[ -f $@ ] || echo '$(TORCH_SPEC)' > $@

# Only llama-cpp-python comes as source: its build dependencies come as wheels (`--no-binary :all:`
# would compile those from source too, cmake among them).
$(LLAMA_SDIST): | $(VENV)/.torch-spec
	$(PIP) download -q --no-deps --no-binary llama-cpp-python -d $(@D) llama-cpp-python==$(LLAMA_VERSION)

$(LLAMA_WHEEL_DIR)/.complete: | $(LLAMA_SDIST)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) scripts/build_llama_wheel.py $(LLAMA_SDIST) $(LLAMA_WHEEL_DIR)

# The sdist stays beside the wheel: the converter is extracted from it.
$(VENV)/.installed: $(VENV)/.torch-spec pyproject.toml setup.py so8t_deploy/bake/_blockfold.c \
		so8t_deploy/bake/_blockfold_isa.h $(LLAMA_WHEEL_DIR)/.complete | $(LLAMA_SDIST)
	$(PIP) install -q "$(TORCH_SPEC)" $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl -e ".[bake,dev]"
	touch $@

# The Ollama test server renders templates with Go's own text/template (tests/gotemplate).
go-toolchain:
	@command -v go >/dev/null || $(MAKE) -s apt-install PACKAGE=golang-go WHY="the Ollama test server needs Go"

# The registry-mode tests run Debian's docker-registry (CNCF distribution) on loopback (tests/registry.py).
test-tools: go-toolchain
	@command -v docker-registry >/dev/null || $(MAKE) -s apt-install PACKAGE=docker-registry \
	  WHY="the registry-mode tests need a registry"

apt-install:
	@{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PACKAGE) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PACKAGE) >/dev/null; }; }; } \
	  || { echo "$(WHY): install Debian's $(PACKAGE)" >&2; exit 1; }

# tests/test_environment.py checks that the suite really runs on SO8T_TEST_TORCH_SPEC. Both run on pytest-xdist
# workers, one more than there are cores: about a sixth of the tests' time is spent waiting on the servers and
# processes they start, which another worker's test fills (measured: README, "Testing"). PYTEST_WORKERS=0 runs
# the suite in this process (for --pdb). Each test starts what it needs on free ports; the expensive session
# fixtures are made once per run and shared by the workers (tests/conftest.py, once_per_run). worksteal
# hands the tests out: their durations range from milliseconds to a minute. Extra pytest arguments:
# PYTEST_ARGS="-k rollout --durations=20".
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
PYTEST := SO8T_TEST_TORCH_SPEC="$(TEST_TORCH_SPEC)" $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal
# The fast lane (README: "Testing"): no llama.cpp build or test server running GGUFs, no Docker, no test that
# loads a chat family's tokenizer or imports torch in a subprocess (marked slow).
FAST_TESTS := not llamacpp and not docker and not slow

test: override TORCH_SPEC := $(TEST_TORCH_SPEC)
test: $(VENV)/.installed test-tools
	$(PYTEST) $(PYTEST_ARGS)

test-fast: override TORCH_SPEC := $(TEST_TORCH_SPEC)
test-fast: $(VENV)/.installed test-tools
	$(PYTEST) -m "$(FAST_TESTS)" $(PYTEST_ARGS)

# Every wheel the worker image needs, at the versions installed here (so both backends produce
# the same bytes), plus the llama.cpp sdist the converter is extracted from. Its wheels of the base
# dependencies also install the torchless control plane that tests/test_docker.py drives.
# setuptools' build/ is removed first: a module deleted from the source would stay in the wheel.
wheelhouse: override TORCH_SPEC := $(TEST_TORCH_SPEC)
wheelhouse: $(VENV)/.installed
	rm -rf $(WHEELHOUSE) build && mkdir -p $(WHEELHOUSE)
	$(PIP) freeze --exclude-editable > .cache/constraints.txt
	$(PIP) wheel -q -w $(WHEELHOUSE) --find-links $(LLAMA_WHEEL_DIR) -c .cache/constraints.txt \
		"$(TEST_TORCH_SPEC)" ".[bake]"
	cp $(LLAMA_SDIST) $(WHEELHOUSE)/

image: override TORCH_SPEC := $(TEST_TORCH_SPEC)
image: wheelhouse
	docker/make-base-image.sh $(BASE_IMAGE)
	$(VENV)/bin/so8t-deploy image build --tag $(TEST_IMAGE) --wheelhouse $(WHEELHOUSE) \
		--build-arg BUILD_IMAGE=$(BASE_IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_SPEC=$(TEST_TORCH_SPEC) --build-arg OFFLINE=1

lint: override TORCH_SPEC := $(TEST_TORCH_SPEC)
lint: $(VENV)/.installed
	$(PY) -m ruff check so8t_deploy tests benchmarks scripts
	$(PY) -m mypy

$(DEMO_DIR)/manifest.yaml: | $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/so8t-deploy demo init $(DEMO_DIR) $(if $(FAMILY),--family $(FAMILY))

deploy: $(VENV)/.installed
	@test -n "$(MANIFEST)" || { echo "usage: make deploy MANIFEST=path/to/manifest.yaml" >&2; exit 2; }
	$(VENV)/bin/so8t-deploy apply "$(MANIFEST)" --cache-dir "$(CACHE_DIR)"

# Both use the hosts of tests/demo_hosts.py: 127.0.0.1:11534 and :11535 (or $OLLAMA_HOST_A and
# $OLLAMA_HOST_B, as manifests/demo.yaml reads them), stores under .so8t/demo-hosts. `make demo`
# deploys to them (to the running ones when `make demo-hosts` is up) and asks every tag for a reply.
# manifests/demo.yaml reads the demo's directory and name from these (defaults: .so8t/demo, so8t-demo).
demo demo-hosts: export SO8T_DEMO_DIR := ../$(DEMO_DIR)
demo demo-hosts: export SO8T_DEMO_NAME := so8t-demo$(if $(FAMILY),-$(subst .,-,$(FAMILY)))
demo: override TORCH_SPEC := $(TEST_TORCH_SPEC)
demo: $(DEMO_DIR)/manifest.yaml go-toolchain
	$(PY) -m tests.demo_hosts $(VENV)/bin/so8t-deploy apply manifests/demo.yaml --cache-dir "$(CACHE_DIR)"

demo-hosts: override TORCH_SPEC := $(TEST_TORCH_SPEC)
demo-hosts: $(DEMO_DIR)/manifest.yaml go-toolchain
	$(PY) -m tests.demo_hosts --serve

# The llama.cpp wheel stays in $(WHEEL_CACHE) (remove it there to rebuild).
clean:
	rm -rf $(VENV) .so8t .pytest_cache .ruff_cache build so8t_deploy/bake/_blockfold.*.so
