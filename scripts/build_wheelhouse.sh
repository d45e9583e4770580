#!/usr/bin/env bash
# Builds .whl/: the wheels an offline GPU machine needs beyond its own image
# (Python 3.12, torch 2.11+cu130, transformers 5.17, numpy, pandas, seaborn, ...;
# see docs/gpu.md) for TrainBench and its framework adapters: pure-Python and
# cp312 manylinux wheels, fetched here from PyPI, and the three sdists built
# into wheels here (DeepSpeed with no ops prebuilt: they JIT-build on the GPU
# machine, whose image has nvcc and ninja). Colossal-AI 0.5.0 needs transformers
# 4.51.3, which needs tokenizers < 0.22 and huggingface-hub < 1.0, so those three
# are carried too (they shadow the image's newer ones for the check only).
# bitsandbytes (~70 MiB of CUDA kernels) is left out: the 8-bit Adam cells are
# not in suites/gpu-smoke.yaml. Fails if the wheelhouse exceeds LIMIT_MIB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
LIMIT_MIB=${LIMIT_MIB:-56}  # the device tool carries 64 MiB with the working tree (~2 MiB)
rm -rf "$DEST" && mkdir -p "$DEST"
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all:)
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORM+=(--platform "$p")
done
WHEELS=(
  "pydantic==2.13.5" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "hjson==3.1.0" "galore-torch==1.0" "peft==0.13.2" "megatron-core==0.16.1"
  "transformers==4.51.3" "tokenizers==0.21.4" "huggingface-hub==0.36.2"
)
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$DEST" "${WHEELS[@]}"
# sdists: built here into py3-none-any wheels (no compiled extension in them)
DS_BUILD_OPS=0 BUILD_EXT=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" \
  deepspeed==0.19.8 colossalai==0.5.0 contexttimer==0.3.3
size=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "wheelhouse: $(ls "$DEST" | wc -l) wheels, ${size} MiB in $DEST (limit ${LIMIT_MIB} MiB)"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "wheelhouse: over the ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
