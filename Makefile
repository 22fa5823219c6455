# One-command setup, training, tests and benchmarks on a fresh Debian/Ubuntu machine.
PY      := .venv/bin/python
STAMP   := .venv/.installed
APT     := libopencv-dev libturbojpeg0-dev pkg-config python3-venv python3-dev build-essential
# what building FFCV (no wheel: a C++ extension) and the venv need, present when all succeed
NEEDS   := pkg-config --exists libturbojpeg opencv4 && command -v c++ && python3 -c \
           "import ensurepip, os, sysconfig; assert os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))"
PROJECT := '.[dev,bench,export]'
ARGS    ?=
# test workers (pytest-xdist, a module per worker: tests/conftest.py); past 4 the slowest
# module bounds the time
JOBS    ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: setup train test test-fast bench report lint clean gpu wheels

setup: $(STAMP)

# FFCV compiles against opencv and turbojpeg, with a C++ compiler and Python's headers, and
# python3 -m venv needs ensurepip (Debian's python3-venv): Debian's packages when one is missing
# (without apt-get, what to install).
# The install: uv fetches and unpacks torch's gigabytes of CUDA wheels in parallel, in half
# pip's time (benchmarks/results/setup-pip-vs-uv-cpu-2core.log); compiled to bytecode as pip
# does, or the first command would compile torch's sources as it imports them (every command,
# where PYTHONDONTWRITEBYTECODE is set). pip, with this machine's own
# configuration (a private index, say), when uv cannot. The extras too, so the tests exercise
# the bench's peers and the exports for real. uv's TMPDIR in .venv: it leaves a lock file in
# the temporary folder per package it builds with setuptools (astral-sh/uv#14385).
$(STAMP): pyproject.toml
	@if ! { $(NEEDS); } >/dev/null 2>&1; then \
	  if ! command -v apt-get >/dev/null; then echo "setup: FFCV's build needs opencv and \
	libjpeg-turbo with their pkg-config files, pkg-config, a C++ compiler, and Python's headers and \
	venv module; install your system's packages of them (on Debian and Ubuntu: $(APT))" >&2; exit 1; \
	  elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT); \
	  else echo "setup: missing system packages; run: sudo apt-get install $(APT)" >&2; exit 1; fi; fi
	$(PY) -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv  # none, or half made
	mkdir -p .venv/tmp
	{ $(PY) -m pip install -q uv && TMPDIR="$(CURDIR)/.venv/tmp" $(PY) -m uv pip install -q \
	  --compile-bytecode --python $(PY) -e $(PROJECT); } || $(PY) -m pip install -q -e $(PROJECT)
	rm -rf .venv/tmp
	touch $(STAMP)

train: setup
	$(PY) engine/train.py $(ARGS)

# everything, as CI runs it
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(JOBS) --durations=15 $(ARGS)

# the edit-test loop: no end-to-end command-line runs
test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" $(ARGS)

# setup installs the [bench] extra: the peers section measures public loaders too
bench: setup
	$(PY) tools/bench.py $(ARGS)

report: setup
	$(PY) tools/report.py $(ARGS)

# the GPU validation (tools/gpu_suite.py, steps in gpu_steps.py): STEP= one or more of tests-quick
# train bench-peers bench-epoch tests-e2e train-eager profile-ffcv bench-step, or the groups tests,
# bench, all (the default: every step, most wanted first); each step under 9 minutes,
# ARGS="--budget S" bounds them all; results in benchmarks/results/gpu-<date>/ (or packed into
# $$OUT). Uses .venv when there is one (no setup here: a bare GPU image installs the wheels of
# .whl/ instead).
STEP ?= all
gpu:
	bash tools/gpu_suite.sh $(STEP) $(ARGS)

# wheels of ffcv, grad-cam and their pure-Python needs for an offline Python 3.12 GPU box
wheels:
	bash tools/wheelhouse.sh

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
