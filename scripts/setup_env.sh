#!/usr/bin/env bash
# Creates the virtual environment and installs TrainBench with its pinned dependencies.
# A torch that is already importable (e.g. your CUDA build, visible through
# --system-site-packages) is never replaced; otherwise the CPU build torch==2.13.0 is installed.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  pip install torch==2.13.0
fi
pip install -r requirements/base.txt -r requirements/frameworks.txt
# Colossal-AI 0.5.0 pins torch<=2.5.1: install it without its dependencies
# (the modules it imports are in requirements/frameworks.txt).
pip install --no-deps colossalai==0.5.0
pip install --no-deps --no-build-isolation -e .
echo "setup: done ($("$VENV/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
