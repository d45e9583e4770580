#!/usr/bin/env bash
# One prepared GPU check (<= 8 minutes on one H100/H200): the CUDA paths of
# every adapter through the real harness (NCCL process group, CUDA-synchronised
# timing, torch.cuda memory stats, table-peak MFU), then a summary of MFU, peak
# memory (allocated and reserved) and each adapter's ratio to the best in-house
# cell. Usage: scripts/gpu_check.sh [SUITE] (default suites/gpu-1x.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:-suites/gpu-1x.yaml}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-results/gpu-check}
[ -x "$BIN/bench" ] || VENV=${BIN%/bin} bash scripts/setup_env.sh

"$BIN/python" - <<'PY'
import torch, torch.distributed as dist
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, nccl available: {dist.is_nccl_available()}")
PY

# A failing step does not stop the later ones (the report and summary are still
# wanted), but it is remembered, and the script exits non-zero at the end.
failed=()

# The GPU-only tests (deselected on CPU machines): flex_attention gradients on CUDA.
"$BIN/python" -m pytest -m gpu -q -p no:cacheprovider || failed+=("pytest -m gpu (exit $?)")

timeout 480 "$BIN/bench" run "$SUITE" --results "$OUT" --no-progress || failed+=("bench run (exit $?; records so far are kept)")
name=$("$BIN/python" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$SUITE")
"$BIN/bench" report "$OUT/$name" || failed+=("bench report (exit $?)")

"$BIN/python" - "$OUT/$name" <<'PY'
import sys
from pathlib import Path

from bench.run.results import read_records, resolve_results

records = list(read_records(resolve_results(Path(sys.argv[1]))[0]))
ok = [r for r in records if r["status"] == "ok"]
print(f"\n{len(ok)} ok / {len(records)} cells")
print(f"{'cell':<13}{'adapter':<11}{'knobs':<44}{'ms/step':>9}{'MFU %':>7}{'alloc GiB':>10}{'resv GiB':>9}")
for r in records:
    m = r.get("metrics") or {}
    c = r["config"]
    knobs = " ".join(f"{k}={c[k]}" for k in ("precision", "zero", "offload", "fusion", "checkpointing", "optimizer")
                     if c.get(k) not in (None, "none", 0, "bf16", "adamw"))
    if r["status"] != "ok":
        print(f"{r['cell_id']:<13}{r['adapter']:<11}{knobs:<44} {r['status']}: {(r['reason'] or '')[:90]}")
        continue
    gib = lambda b: f"{b / 2**30:.2f}" if b else "—"
    mfu = f"{m['mfu'] * 100:.1f}" if m.get("mfu") is not None else "—"
    print(f"{r['cell_id']:<13}{r['adapter']:<11}{knobs:<44}{m['step_time_median_s'] * 1e3:>9.1f}{mfu:>7}"
          f"{gib(m.get('peak_mem_bytes')):>10}{gib(m.get('peak_reserved_bytes')):>9}")
best = min((r for r in ok if r["adapter"] == "inhouse"), key=lambda r: r["metrics"]["step_time_median_s"], default=None)
if best:
    t = best["metrics"]["step_time_median_s"]
    print(f"\nbest in-house cell {best['cell_id']}: {t * 1e3:.1f} ms/step, MFU "
          f"{(best['metrics']['mfu'] or 0) * 100:.1f} %")
    for adapter in sorted({r["adapter"] for r in ok} - {"inhouse"}):
        fastest = min((r for r in ok if r["adapter"] == adapter), key=lambda r: r["metrics"]["step_time_median_s"])
        print(f"  {adapter:<11} fastest cell {fastest['cell_id']}: in-house ÷ {adapter} step time = "
              f"{t / fastest['metrics']['step_time_median_s']:.2f}")
# Same cell, different adapter: the like-for-like ratios.
key = lambda r: tuple(sorted((k, str(v)) for k, v in r["config"].items() if k != "adapter"))
mine = {key(r): r for r in ok if r["adapter"] == "inhouse"}
for r in ok:
    twin = mine.get(key(r))
    if r["adapter"] != "inhouse" and twin:
        print(f"  same knobs, in-house {twin['cell_id']} ÷ {r['adapter']} {r['cell_id']}: step time "
              f"{twin['metrics']['step_time_median_s'] / r['metrics']['step_time_median_s']:.2f}, peak allocated "
              f"{(twin['metrics']['peak_mem_bytes'] or 0) / max(r['metrics']['peak_mem_bytes'] or 1, 1):.2f}")
PY

if [ ${#failed[@]} -gt 0 ]; then
  printf 'GPU check FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "GPU check passed"
