#!/usr/bin/env bash
# Install the test dependencies and run the whole suite: lint, backend tests, plugin tests in real QGIS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen
.venv/bin/ruff check backend qgis_plugin tests scripts benchmarks
.venv/bin/ruff format --check backend qgis_plugin tests scripts benchmarks
.venv/bin/python -m mypy  # backend/earthdial, configured in pyproject.toml's [tool.mypy]
.venv/bin/python scripts/build_plugin.py --sync >/dev/null  # the shared contract modules, as the build copies them
.venv/bin/bandit -q -r qgis_plugin  # the QGIS plugin repository blocks uploads on Bandit findings
.venv/bin/python -m pytest tests/backend -q -p no:cacheprovider
.venv-qgis/bin/python -m pytest tests/plugin -q -p no:cacheprovider
