#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev, hf and view-test extras.
# Idempotent.
# torch is pinned to 2.13.0: the CPU wheel of this release installs without a multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import bdh, pytest, transformers, playwright" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 and bdh[dev,hf,view-test] (about a minute)"
    .venv/bin/python -m pip install --quiet torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install --quiet -e ".[dev,hf,view-test]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import bdh, torch; print(f'[setup] bdh {bdh.__version__}, torch {torch.__version__}')"
fi
