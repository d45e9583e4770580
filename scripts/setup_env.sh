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
# Megatron-Core 0.16.1 (the newest for Python 3.11) needs only torch, numpy and packaging:
# without --no-deps pip could resolve a torch of its choosing.
pip install --no-deps megatron-core==0.16.1
pip install --no-deps --no-build-isolation -e .
# Headless Chromium for the browser test of the HTML report (tests/test_report_browser.py).
if command -v chromium >/dev/null 2>&1; then
  :
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium (headless report test)"
  { DEBIAN_FRONTEND=noninteractive apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y chromium; } \
    >/dev/null || echo "setup: warning: apt-get install chromium failed; the headless report test will not run" >&2
else
  echo "setup: warning: chromium is not installed and this is not root with apt-get;" \
       "the headless report test skips (and fails under CI=true). Install it with: sudo apt-get install -y chromium" >&2
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
