# flowkern: the whole set-up is `make test` (build + tests) and `make bench` (build + benchmarks).
# Both create .venv when it is missing and install the pinned toolchain into it.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIN    := torch==2.14.1 torchvision==0.29.1
DEPS   := numpy pytest pytest-benchmark hypothesis tqdm setuptools wheel ninja
BENCH_ARGS ?= --quick

.PHONY: venv build test test-isa test-fast bench bench-pytest wheel wheel-check gpu-check clean

$(VENV)/.toolchain: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install $(PIN) $(DEPS)
	# nflows (the tests hold the spline to its numbers), zuko and normflows: the benchmark's peers.
	# --no-deps: they need nothing else to import what we use (normflows: torch and numpy), and
	# nflows' declared deps (matplotlib, tensorboard) are not ours.
	$(VPY) -m pip install --no-deps nflows==0.14 zuko==1.6.0 normflows==1.7.3
	# sbi (flowkern.sbi, tests/test_sbi.py) with its own dependencies; it keeps the pinned torch.
	$(VPY) -m pip install sbi==0.27.0
	touch $@

venv: $(VENV)/.toolchain

# Rebuilds the extension only when a source under csrc/ or setup.py changed.
$(VENV)/.built: $(VENV)/.toolchain setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(VPY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(VPY) -m pytest tests -q
	TRITON_INTERPRET=1 $(VPY) -m pytest tests -q -m triton
	$(MAKE) test-isa

# The compiled CPU kernels' tests again under every lower capability this CPU runs (the suite
# above ran the best one): FLOWKERN_CPU_CAPABILITY=DEFAULT (and AVX2 on an AVX-512 machine).
LOWER_CAPS = $(VPY) -c "from flowkern import _ext; print(*[c for c in _ext.host_capabilities()[:-1] if c in _ext.built_capabilities()])"
test-isa: build
	@set -e; for cap in $$($(LOWER_CAPS)); do \
	    echo "== CPU kernel tests at FLOWKERN_CPU_CAPABILITY=$$cap"; \
	    FLOWKERN_CPU_CAPABILITY=$$cap $(VPY) -m pytest tests -q -m "cpu_kernels or isa"; \
	done

test-fast: build
	$(VPY) -m pytest tests -q -x

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

bench-pytest: build
	$(VPY) -m pytest benchmarks/test_bench_kernels.py --benchmark-only -q

# A binary wheel (every CPU capability, and the CUDA kernels when nvcc is here) in dist/.
wheel: venv
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

# Builds a wheel from the tracked sources, installs it in a fresh venv beside the pinned torch
# and imports it there with no compiler on PATH (.ci/wheel_check.sh).
wheel-check: venv
	bash .ci/wheel_check.sh

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build dist flowkern/_C*.so flowkern/_cpu_*.so *.egg-info $(VENV)/.built
