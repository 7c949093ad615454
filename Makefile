# flowkern: the whole set-up is `make test` (build + tests) and `make bench` (build + benchmarks).
# Both create .venv when it is missing and install the pinned toolchain into it.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIN    := torch==2.14.1 torchvision==0.29.1
DEPS   := numpy pytest pytest-benchmark hypothesis tqdm setuptools wheel ninja
BENCH_ARGS ?= --quick

.PHONY: venv build test test-fast bench bench-pytest gpu-check clean

$(VENV)/.toolchain: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install $(PIN) $(DEPS)
	# nflows (the tests hold the spline to its numbers), zuko and normflows: the benchmark's peers.
	# --no-deps: they need nothing else to import what we use (normflows: torch and numpy), and
	# nflows' declared deps (matplotlib, tensorboard) are not ours.
	$(VPY) -m pip install --no-deps nflows==0.14 zuko==1.6.0 normflows==1.7.3
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

test-fast: build
	$(VPY) -m pytest tests -q -x

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

bench-pytest: build
	$(VPY) -m pytest benchmarks/test_bench_kernels.py --benchmark-only -q

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build flowkern/_C*.so *.egg-info $(VENV)/.built
