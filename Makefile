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
# CPU machines also run the Triton kernel tests, under Triton's interpreter. Triton goes into its own folder,
# seen only by that run, so the CPU torch never imports it (on a CUDA machine `make gpu-check` runs them).
TRITON_CPU_SPEC ?= triton==3.6.0
TRITON_SITE := $(VENV)/triton-site
KERNEL_TESTS := tests/test_kernels.py tests/test_gemv.py tests/test_tree_kernels.py

.PHONY: setup test test-kernels lint demo clean-demo gpu-check

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
	$(MAKE) --no-print-directory test-kernels

test-kernels: setup
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: the kernel tests run on the GPU (make gpu-check)"; \
	elif test -d $(TRITON_SITE) || { rm -rf $(TRITON_SITE).part && \
			$(PIP) install -q --no-deps --target $(TRITON_SITE).part "$(TRITON_CPU_SPEC)" && \
			mv $(TRITON_SITE).part $(TRITON_SITE); }; then \
		echo "Triton kernel tests under the interpreter ($(TRITON_CPU_SPEC), fp32)"; \
		PYTHONPATH=$(TRITON_SITE) TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" $(KERNEL_TESTS); \
	else \
		echo "could not install $(TRITON_CPU_SPEC) into $(TRITON_SITE): kernel tests not run (set TRITON_CPU_SPEC)"; \
	fi

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m scripts.demo

gpu-check: setup
	$(PY) -m pytest -q -m gpu
