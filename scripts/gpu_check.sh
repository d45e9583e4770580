#!/usr/bin/env bash
# The prepared device check (docs/gpu.md): preflight, DeepSpeed's JIT ops in the
# background, suites/gpu-smoke.yaml through the harness, the report, the
# gpu-marked tests, a summary; at most four files under $OUT. Exits non-zero
# when any step or cell fails (every failure is named at the end).
#
#   scripts/gpu_check.sh [SUITE]                 on a GPU node (its own CUDA torch)
#   DEVICE=cpu scripts/gpu_check.sh              dry run of the same steps on CPU
#
# Interpreter: $PY, else the project's .venv, else the machine's python3 (the
# lent offline machine, whose python3 holds its CUDA torch: never reinstalled).
# Wheels: when the interpreter is not already a TrainBench environment (no
# pydantic: the lent machine's image) and $WHEELS (default .whl, built by `make
# wheelhouse`) holds wheels, they are installed offline (--no-index) into $SITE
# and put first on PYTHONPATH. USE_WHEELS=1 forces it, USE_WHEELS=0 skips it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SUITE=${1:-suites/gpu-smoke.yaml}
OUT=${OUT:-results/gpu-check}
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
USE_WHEELS=${USE_WHEELS:-auto}
if [ "$USE_WHEELS" = auto ]; then
  USE_WHEELS=0
  if compgen -G "$WHEELS/*.whl" >/dev/null && ! "$PY" -c "import pydantic" 2>/dev/null; then USE_WHEELS=1; fi
fi
if [ "$USE_WHEELS" = 1 ]; then
  SITE=${SITE:-/tmp/trainbench-site}
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl; then
    echo "GPU check FAILED: offline install of $WHEELS into $SITE" >&2
    exit 1
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/device_check.py --suite "$SUITE" --out "$OUT" --device "${DEVICE:-cuda}" ${BUDGET_S:+--budget-s "$BUDGET_S"}
