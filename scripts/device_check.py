"""The prepared device check (run by scripts/gpu_check.sh; see docs/gpu.md).

Steps, each timed, none of whose failures is swallowed (the check still runs
the later steps, then exits 1 naming every failed one):

1. preflight (≤ 15 s): versions, the device, CUDA/NCCL/cuDNN, nvcc and Python.h
   for DeepSpeed's JIT ops, every framework import, the device's peak-FLOPs entry;
2. DeepSpeed's JIT ops (FusedAdam, CPUAdam) built in the background (CUDA only);
3. ``bench run`` of the suite (``--device cpu``: a dry run of the same suite
   shrunk to the tiny model on CPU ranks, so the plumbing is checked anywhere);
4. ``bench report``;
5. the ``gpu``-marked tests (CUDA only; collected in a dry run);
6. a summary table: ok cells per adapter, step time, MFU, CUDA peak ÷ the
   memory fit's prediction, bubble ÷ (p−1)/m; the best in-house cell's MFU
   against each framework's on the same cell.

Everything lands in at most four files under --out: results.jsonl, summary.txt,
check.log (every step's output) and artifacts.tar.gz (logs + HTML report).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
IMPORTS = ("pydantic", "deepspeed", "colossalai", "megatron.core", "transformers", "galore_torch", "bitsandbytes")
OPTIONAL = {"bitsandbytes"}  # not carried in the wheelhouse (its 8-bit cells are not in the device suite)
FAILED_STATUSES = ("error", "timeout", "oom")


class Check:
    def __init__(self, out: Path, work: Path) -> None:
        self.out, self.work, self.failed = out, work, []
        self.log = (out / "check.log").open("a")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def fail(self, what: str) -> None:
        self.failed.append(what)
        self.say(f"FAILED: {what}")

    def run(self, name: str, cmd: list[str], timeout: float, **kw) -> int:
        """A step as a subprocess; its output goes to the console and to check.log."""
        start = time.monotonic()
        self.say(f"== {name}: {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, **kw)
            rc, text = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        self.say(text.rstrip()[-20000:])
        self.say(f"== {name}: exit {rc} in {time.monotonic() - start:.0f} s")
        if rc != 0:
            self.fail(f"{name} (exit {rc})")
        return rc


def preflight(check: Check, device: str) -> bool:
    """Facts first; False when the check cannot go on (no CUDA device on a CUDA check)."""
    import torch

    start = time.monotonic()
    check.say(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}")
    if device == "cuda":
        if not torch.cuda.is_available():
            check.fail("preflight: no CUDA device: this check needs a GPU (DEVICE=cpu runs the dry run)")
            return False
        p = torch.cuda.get_device_properties(0)
        check.say(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible, "
                  f"capability {p.major}.{p.minor}; CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                  f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        nvcc = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
        check.say(f"nvcc: {nvcc or 'NOT FOUND (DeepSpeed JIT ops will fail)'}")
        if nvcc is None:
            check.fail("preflight: nvcc not found")
        from bench.meters.throughput import gpu_peak_flops

        peak = gpu_peak_flops(p.name, "bf16")
        check.say(f"peak bf16 dense FLOP/s entry for {p.name!r}: {peak:.3g}" if peak else
                  f"no peak-FLOPs entry for {p.name!r}: MFU will be withheld")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    check.say(f"Python.h: {header if header.exists() else 'NOT FOUND (JIT-built ops need it)'}")
    if not header.exists() and device == "cuda":
        check.fail("preflight: Python.h not found")
    for name in IMPORTS:
        try:
            mod = importlib.import_module(name)
            check.say(f"import {name}: ok {getattr(mod, '__version__', '')}")
        except Exception as e:  # noqa: BLE001 - every import failure is reported, with its cause
            line = f"import {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            check.say(line) if name in OPTIONAL else check.fail(f"preflight: {line}")
    check.say(f"preflight: {time.monotonic() - start:.1f} s")
    return True


def cpu_variant(suite: Path, work: Path) -> Path:
    """The suite shrunk for a CPU dry run: every cell on CPU with the tiny model,
    64 tokens, batch 8 (ranks as given); CUDA-only cells come back unsupported."""
    data = yaml.safe_load(suite.read_text())
    shrink = {"device": "cpu", "model": "tiny", "seq_len": 64, "batch_size": 8}

    def cell(c: dict) -> dict:
        return {**c, **{k: v for k, v in shrink.items() if k in c}}

    data["defaults"] = {**data.get("defaults", {}), **shrink}
    data["include"] = [cell(c) for c in data.get("include", [])]
    data["timeout_s"] = 180
    data["name"] = data["name"] + "-cpu-dry"
    path = work / "suite-cpu-dry.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


FIXED_S = {"default": 15.0, "cpu": 5.0, "compile": 60.0, "attention": 40.0}
"""Estimated per-cell cost beyond its steps (guesses until a device run measures them): the warm
launcher forks ranks from a server that imported torch once, so a GPU cell pays its CUDA context,
framework imports and model build (~15 s); torch.compile and flex_attention compile in warm-up."""


def budget(suite: Path, gpu: str = "NVIDIA H100 80GB HBM3") -> tuple[float, list[str]]:
    """Estimated wall time of a suite on one GPU: per cell a fixed cost (FIXED_S)
    plus (warm-up + steps) × the planner's step estimate with the peak-table GPU
    profile (bench.plan, no measurement; CPU cells: 0.5 s a step). An estimate
    for planning the device time, printed before the run; not a measurement."""
    from bench import adapters
    from bench.config.suite import load_suite
    from bench.plan.cost_model import estimate
    from bench.plan.machine import default_gpu_profile

    settings, cells = load_suite(suite)
    profile = default_gpu_profile(gpu)
    total, lines = 0.0, []
    for c in cells:
        k = c.knobs
        fixed = FIXED_S["compile" if k.fusion == "compile" else "attention" if k.workload == "attention"
                        else "cpu" if k.device == "cpu" else "default"]
        if adapters.why_not(k):  # refused before launch: no cost
            step, fixed = 0.0, 0.0
        elif k.device == "cpu" or k.workload != "train":
            step = 0.5
        else:
            step = estimate(k, profile).step_time_s
        cell_s = fixed + (settings.warmup + settings.steps) * step
        total += cell_s
        lines.append(f"  {c.id} {k.adapter:<11} {cell_s:6.1f} s")
    return total, lines


def summary(records: list[dict], fit: dict[str, float]) -> str:
    """One line per cell, then ok cells per adapter and the MFU comparison."""
    lines = [f"{'cell':<13}{'adapter':<11}{'status':<12}{'knobs':<46}{'ms/step':>9}{'MFU %':>7}"
             f"{'peak GiB':>9}{'÷ fit':>7}{'bubble ÷ (p-1)/m':>17}"]
    per_adapter: dict[str, list[int]] = {}
    for r in records:
        c, m, n = r["config"], r.get("metrics") or {}, r.get("notes") or {}
        ok = r["status"] == "ok"
        per_adapter.setdefault(r["adapter"], [0, 0])[0 if ok else 1] += 1
        knobs = " ".join([c["model"], c["precision"], c["device"]]
                         + [f"{k}={c[k]}" for k in ("zero", "offload", "fusion", "attention", "workload")
                            if c.get(k) not in (None, "none", 0, "dense", "train")]
                         + ([f"pp={c['pp']} {c['pp_schedule']} m={c['microbatches']}"] if c.get("pp", 1) > 1 else []))
        if not ok:
            lines.append(f"{r['cell_id']:<13}{r['adapter']:<11}{r['status']:<12}{knobs[:45]:<46} {(r['reason'] or '')[:100]}")
            continue
        peak = m.get("peak_mem_bytes")
        ratio = peak / fit[r["cell_id"]] if peak and fit.get(r["cell_id"]) else None
        bubble = n.get("bubble_measured_over_theory")
        lines.append(f"{r['cell_id']:<13}{r['adapter']:<11}{'ok':<12}{knobs[:45]:<46}"
                     f"{m['step_time_median_s'] * 1e3:>9.1f}{(m['mfu'] or 0) * 100 if m.get('mfu') else float('nan'):>7.1f}"
                     f"{(peak or 0) / 2**30:>9.2f}{ratio if ratio else float('nan'):>7.2f}"
                     f"{bubble if bubble is not None else float('nan'):>17.2f}")
    lines.append("")
    lines.append("ok / not ok per adapter: " + ", ".join(f"{a} {v[0]}/{v[1]}" for a, v in sorted(per_adapter.items())))
    ok = [r for r in records if r["status"] == "ok" and (r.get("metrics") or {}).get("mfu")]
    mine = [r for r in ok if r["adapter"] == "inhouse"]
    if mine:
        best = max(mine, key=lambda r: r["metrics"]["mfu"])
        lines.append(f"best in-house MFU: {best['metrics']['mfu'] * 100:.1f} % ({best['cell_id']}, "
                     f"{best['config']['model']})")
        from bench.analysis.report.adapter_ratios import same_cell_groups

        for group in same_cell_groups(ok):  # cells that differ only in the adapter, as the report pairs them
            t = group.get("inhouse")
            for adapter, r in sorted(group.items()):
                if t and adapter != "inhouse":
                    lines.append(f"  same cell: in-house MFU {t['metrics']['mfu'] * 100:.1f} % vs {adapter} "
                                 f"{r['metrics']['mfu'] * 100:.1f} %")
    return "\n".join(lines)


def predicted_peaks(records: list[dict]) -> dict[str, float]:
    """The pre-launch memory fit's device bytes per cell (bench.plan.fit)."""
    from bench.config.knobs import Knobs
    from bench.plan.fit import predict_device_bytes

    out = {}
    for r in records:
        pred = predict_device_bytes(Knobs(**r["config"]))
        if pred is not None:
            out[r["cell_id"]] = pred.total_bytes
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="suites/gpu-smoke.yaml")
    ap.add_argument("--out", default="results/gpu-check")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock limit of the suite run")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trainbench-check-"))
    check = Check(out, work)
    started = time.monotonic()
    if not preflight(check, args.device):
        return finish(check, [], "")
    py = sys.executable
    builder = None
    if args.device == "cuda":  # JIT-build DeepSpeed's ops while the other adapters' cells run
        log = (work / "deepspeed_ops.log").open("w")
        builder = subprocess.Popen([py, "-c", "from deepspeed.ops.op_builder import FusedAdamBuilder, CPUAdamBuilder; "
                                    "FusedAdamBuilder().load(); CPUAdamBuilder().load(); print('deepspeed ops built')"],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    estimate_s, lines = budget(REPO / args.suite)
    check.say("\n".join([f"estimated time of {args.suite} on one GPU: {estimate_s:.0f} s "
                          f"(budget {args.budget_s:.0f} s)", *lines]))
    suite = REPO / args.suite if args.device == "cuda" else cpu_variant(REPO / args.suite, work)
    name = yaml.safe_load(suite.read_text())["name"]
    results = work / "results"
    check.run("bench run", [py, "-m", "bench.cli", "run", str(suite), "--results", str(results), "--no-progress"],
              timeout=args.budget_s)
    records = []
    files = sorted((results / name).glob("*.jsonl"))
    if files:
        from bench.run.results import read_records

        records = list(read_records(files[-1]))
        shutil.copy(files[-1], out / "results.jsonl")
        for r in records:
            if r["status"] in FAILED_STATUSES:
                check.fail(f"cell {r['cell_id']} ({r['adapter']}): {r['status']}: {(r['reason'] or '')[:200]}")
        check.run("bench report", [py, "-m", "bench.cli", "report", str(results / name), "--out", str(work / "report")],
                  timeout=120)
    else:
        check.fail("bench run wrote no records")
    tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"] + (
        [] if args.device == "cuda" else ["--collect-only"])
    check.run("pytest -m gpu" + ("" if args.device == "cuda" else " (collect only)"), tests, timeout=240)
    if builder is not None:
        try:
            builder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            builder.kill()
        if builder.returncode != 0:
            check.fail(f"DeepSpeed JIT op build (exit {builder.returncode}; deepspeed_ops.log)")
    table = summary(records, predicted_peaks(records)) if records else ""
    check.say(f"check wall time: {time.monotonic() - started:.0f} s")
    return finish(check, records, table)


def finish(check: Check, records: list[dict], table: str) -> int:
    verdict = ("GPU check passed" if not check.failed else
               "GPU check FAILED: " + "; ".join(check.failed))
    (check.out / "summary.txt").write_text(f"{table}\n\n{verdict}\n")
    check.say(table)
    check.log.close()
    with tarfile.open(check.out / "artifacts.tar.gz", "w:gz") as tar:
        tar.add(check.work, arcname="gpu-check")
    shutil.rmtree(check.work, ignore_errors=True)
    print(verdict, file=sys.stderr if check.failed else sys.stdout)
    return 1 if check.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
