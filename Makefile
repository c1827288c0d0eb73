# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Quiet set-up: no pip version notice, no setuptools deprecation banners from the build backend.
PIP := PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip
# CPU machines get this torch first (a plain `torch` requirement may pull a multi-GB CUDA build).
TORCH_CPU_SPEC ?= torch==2.13.0
# Optional extra pip arguments for the CPU torch, e.g. an index URL serving CPU wheels.
TORCH_CPU_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo clean-demo gpu-check

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from requirements.txt"; \
	else \
		echo "no CUDA: installing the CPU build of torch ($(TORCH_CPU_SPEC))"; \
		$(PIP) install -q "$(TORCH_CPU_SPEC)" $(TORCH_CPU_PIP_ARGS); \
	fi
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m scripts.demo

gpu-check: setup
	$(PY) -m pytest -q -m gpu
