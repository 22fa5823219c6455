#!/usr/bin/env bash
# The GPU validation (tools/gpu_suite.py) with the right interpreter and the checkout on
# PYTHONPATH: $PYTHON if set, else the checkout's .venv (make setup), else python3 (a bare GPU
# image, where the suite installs the wheels of .whl/ first). Usage: bash tools/gpu_suite.sh
# [STEP ...] [--dry-run] [--budget SECONDS] [--results DIR] [--bundle FILE.tar.gz]; --help lists
# the steps.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
# no cd: relative --results, --bundle and $OUT name places from where the suite is called
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m tools.gpu_suite "$@"
