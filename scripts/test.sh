#!/usr/bin/env bash
# Install the test dependencies and run the whole suite: lint, backend tests, plugin tests in real QGIS.
# --qgis-3.40: the plugin tests once more on QGIS 3.40 LTR, in a Debian trixie chroot (scripts/qgis_chroot.sh:
# needs root; builds the chroot on first use, about 8 minutes, then reuses it). CI (.ci/run) passes it.
set -euo pipefail
cd "$(dirname "$0")/.."
second_qgis=0
[ "${1:-}" = "--qgis-3.40" ] && second_qgis=1
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen
.venv/bin/ruff check backend qgis_plugin tests scripts benchmarks
.venv/bin/ruff format --check backend qgis_plugin tests scripts benchmarks
.venv/bin/python scripts/build_plugin.py --sync >/dev/null  # the shared contract modules, as the build copies them
.venv/bin/python -m mypy  # backend and plugin (which needs the contract copies), pyproject.toml's [tool.mypy]
.venv/bin/bandit -q -r qgis_plugin  # the QGIS plugin repository blocks uploads on Bandit findings
.venv/bin/python -m pytest tests/backend -q -p no:cacheprovider
.venv-qgis/bin/python -m pytest tests/plugin -q -p no:cacheprovider
if [ "$second_qgis" = 1 ]; then bash scripts/qgis_chroot.sh tests/plugin -q -p no:cacheprovider; fi
