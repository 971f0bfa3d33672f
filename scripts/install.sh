#!/usr/bin/env bash
# Installs everything on a fresh Debian/Ubuntu machine (idempotent):
#   - QGIS 3.22+ with its Python bindings, pyzmq and Xvfb (Debian packages);
#   - .venv       the backend: torch (CPU build unless TORCH_SPEC says otherwise), transformers, rasterio ...
#   - .venv-qgis  QGIS's own Python plus pytest-qgis and qtpy, for the plugin's tests.
# Usage: scripts/install.sh [--test]   (--test adds the test tools, peft for the fine-tuning tests, Ray)
set -euo pipefail
cd "$(dirname "$0")/.."
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

apt_pkgs=(qgis python3-qgis python3-zmq python3-venv xvfb)
if ! dpkg -s "${apt_pkgs[@]}" >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}"
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
# torch first, pinned to pyproject.toml's version: an unpinned torch would pull a multi-GB CUDA build.
# (README.md: the CUDA build through TORCH_SPEC and PIP_INDEX_URL; tests/backend/test_packaging.py checks
# that this default and pyproject.toml name the same release.)
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "$with_test" = 1 ]; then
  # quantize: torchao, so the --quantize tests run; cluster: Ray, for detect-many's tests
  .venv/bin/pip install -q -e ".[test,quantize,finetune,cluster]"
else
  .venv/bin/pip install -q -e .
fi

# QGIS's Python (Debian's /usr/bin/python3) sees qgis, PyQt5, numpy and zmq through system site-packages.
if [ ! -x .venv-qgis/bin/python ]; then /usr/bin/python3 -m venv --system-site-packages .venv-qgis; fi
.venv-qgis/bin/pip install -q "qtpy>=2.0"
if [ "$with_test" = 1 ]; then
  .venv-qgis/bin/pip install -q "pytest>=8" "pytest-qgis>=2.0"
fi
echo "installed: backend in .venv (earthdial: .venv/bin/earthdial), QGIS Python in .venv-qgis"
