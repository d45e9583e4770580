"""The auto-parallel planner's choice against DeepSpeed's autotuner, on the
space both can search: ZeRO stage 0–3 × micro-batch count at one global batch
(dp only; the autotuner cannot change tp or pp).

DeepSpeed's autotuner (``deepspeed --autotuning tune``) launches one short
training run per candidate and keeps the one with the highest throughput; the
planner predicts every candidate from the machine profile and measures none.
This script runs the autotuner on ``impl.model.Decoder`` (this file is also its
training script), reads its choice and its measured throughputs from its
results folder, asks the planner for its top-1 in the same space, then times
both picks through the harness (``bench run``, DeepSpeed adapter) in one run.

    python -m bench.plan.autotune_compare --out /tmp/autotune [--model small]

Three things the autotuner needs on a CPU-only host: ``LOCAL_SIZE`` = ranks
(the CPU accelerator's ``device_count()`` reads it, else it counts NUMA
nodes), ``deepspeed`` on PATH (it relaunches itself per experiment), and the
harness's ``TORCH_EXTENSIONS_DIR``: each rank JIT-loads the shm comm op, and
a lock left in the default cache by a killed build makes every rank wait on
it forever (torch.utils.file_baton) with nothing printed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import REPO
STAGES = (0, 1, 2, 3)
PROFILE_STEPS = (3, 6)
"""The autotuner times optimizer steps start..end (its start/end_profile_step)."""


@dataclass(frozen=True, slots=True)
class Experiment:
    """One autotuner experiment, read back from its folder."""
    name: str
    zero: int
    micro_batch_size: int
    microbatches: int
    """Gradient-accumulation steps = the harness's ``microbatches``."""
    throughput: float | None
    """samples per second as DeepSpeed writes it (None: no metrics.json)."""
    latency_s: float | None
    """Its step time: trimmed-mean (forward + backward + step) of a micro-batch
    × accumulation steps (metrics.json's ``latency`` is in µs)."""


def base_cell(model: str, world_size: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    return {"adapter": "deepspeed", "model": model, "device": "cpu", "world_size": world_size,
            "batch_size": batch_size, "seq_len": seq_len}


def space(base: dict[str, Any]) -> dict[str, list[Any]]:
    """The comparable space as a planner ``space``: dp = world, ZeRO 0–3, every
    power-of-two micro-batch count dividing the per-rank batch."""
    per_rank = base["batch_size"] // base["world_size"]
    micro = [m for m in range(1, per_rank + 1) if per_rank % m == 0 and m & (m - 1) == 0]
    return {"tp": [1], "pp": [1], "zero": list(STAGES), "microbatches": micro, "offload": ["none"],
            "checkpointing": ["none"], "sequence_parallel": ["none"]}


def autotuner_config(base: dict[str, Any]) -> dict[str, Any]:
    """The adapter's DeepSpeed config for the cell, with the stage and the
    micro-batch size turned into the lists the autotuner searches. Global batch
    and accumulation steps are left out: the autotuner sets them per experiment
    (gas = per-rank batch ÷ micro-batch size)."""
    from bench.adapters.deepspeed.adapter import deepspeed_config
    from bench.config.knobs import Knobs
    from impl.model_config import PRESETS, total_params

    knobs = Knobs.model_validate({**base, "dp": base["world_size"]})
    config = deepspeed_config(knobs, total_params(PRESETS[base["model"]]))
    for key in ("train_batch_size", "gradient_accumulation_steps", "comms_logger"):
        config.pop(key)
    per_rank = base["batch_size"] // base["world_size"]
    config["train_micro_batch_size_per_gpu"] = sorted(per_rank // m for m in space(base)["microbatches"])
    config["zero_optimization"] = {"stage": list(STAGES)}
    config["autotuning"] = {"enabled": True, "fast": True, "metric": "throughput", "tuner_type": "gridsearch",
                            "start_profile_step": PROFILE_STEPS[0], "end_profile_step": PROFILE_STEPS[1],
                            "arg_mappings": {}}
    return config


def run_autotuner(workdir: Path, base: dict[str, Any], timeout_s: float) -> Path:
    """Runs ``deepspeed --autotuning tune`` in ``workdir``; its results folder."""
    from bench.adapters.deepspeed.adapter import TORCH_EXTENSIONS_DIR
    from bench.run.launchers.torchrun import LocalTorchrun

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ds.json").write_text(json.dumps(autotuner_config(base), indent=1))
    (workdir / "cell.json").write_text(json.dumps(base))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **LocalTorchrun.network_env(), "LOCAL_SIZE": str(base["world_size"]),
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    cmd = [str(Path(bindir) / "deepspeed"), "--autotuning", "tune", "--num_gpus", str(base["world_size"]),
           str(Path(__file__).resolve()), "--deepspeed", "--deepspeed_config", "ds.json"]
    with open(workdir / "autotuner.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: launcher and ranks
            proc.wait()
            raise TimeoutError(f"the autotuner ran past {timeout_s:.0f} s; see {workdir / 'autotuner.log'}")
    return workdir / "autotuning_results"


def read_results(results_dir: Path) -> tuple[list[Experiment], Experiment]:
    """Every micro-batch experiment the autotuner ran (``z<stage>_gas<g>_tmbspg<b>``
    folders: ds_config.json, metrics.json) and its choice (ds_config_optimal.json)."""
    exps = []
    for d in sorted(results_dir.iterdir()):
        if not (d / "ds_config.json").exists() or d.name == "profile_model_info":
            continue
        cfg = json.loads((d / "ds_config.json").read_text())
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
        exps.append(Experiment(d.name, cfg["zero_optimization"]["stage"], cfg["train_micro_batch_size_per_gpu"],
                               cfg["gradient_accumulation_steps"], metrics.get("throughput"),
                               metrics["latency"] / 1e6 if "latency" in metrics else None))
    if not exps:
        raise ValueError(f"{results_dir}: no autotuner experiment folders (see the autotuner log beside it)")
    optimal = results_dir / "ds_config_optimal.json"
    if not optimal.exists():
        raise ValueError(f"{optimal} missing: no experiment of the autotuner produced a metric")
    best = json.loads(optimal.read_text())
    key = (best["zero_optimization"]["stage"], best["train_micro_batch_size_per_gpu"])
    (chosen,) = [e for e in exps if (e.zero, e.micro_batch_size) == key]
    return exps, chosen


def planner_ranking(base: dict[str, Any], profile: Any, profile_path: Path | None = None) -> list[Any]:
    """The planner's feasible plans in the comparable space, best first."""
    from bench import adapters
    from bench.plan.planner import layer_profiler
    from bench.plan.search import search

    return search(base, profile, memory_budget_bytes=None, why_not=adapters.why_not, space=space(base),
                  prepare=layer_profiler(profile, profile_path)).plans


def measure(workdir: Path, base: dict[str, Any], choices: dict[str, dict[str, int]], steps: int) -> dict[str, dict]:
    """Times each pick (label → {zero, microbatches}) in one `bench run`; label → record."""
    import yaml

    first, *rest = {json.dumps(c, sort_keys=True): c for c in choices.values()}.values()
    # No matrix: the defaults are one cell (the first pick), each include one more.
    suite = {"name": "autotune-compare", "steps": steps, "warmup": 2, "timeout_s": 300,
             "defaults": {**base, **first}, "include": rest}
    (workdir / "suite.yaml").write_text(yaml.safe_dump(suite))
    subprocess.run([sys.executable, "-m", "bench.cli", "run", str(workdir / "suite.yaml"), "--results",
                    str(workdir / "results"), "--no-progress"], cwd=REPO, check=True, timeout=1800)
    recs = [json.loads(line) for f in (workdir / "results" / suite["name"]).glob("*.jsonl")
            for line in f.read_text().splitlines() if line.strip()]
    out = {}
    for label, choice in choices.items():
        (rec,) = [r for r in recs if all(r["config"][k] == v for k, v in choice.items())]
        out[label] = rec
    return out


def compare(workdir: Path, base: dict[str, Any], *, steps: int = 8, timeout_s: float = 1500) -> dict[str, Any]:
    """Autotuner, planner, then both picks timed in one harness run; the
    result is also written to ``workdir/comparison.json``."""
    from bench.plan.planner import load_profile

    exps, chosen = read_results(run_autotuner(workdir / "autotuner", base, timeout_s))
    plans = {(p.knobs.zero, p.knobs.microbatches): p for p in planner_ranking(base, *load_profile("cpu"))}
    top1 = next(iter(plans.values()))
    choices = {"planner": {"zero": top1.knobs.zero, "microbatches": top1.knobs.microbatches},
               "autotuner": {"zero": chosen.zero, "microbatches": chosen.microbatches}}
    recs = measure(workdir, base, choices, steps)
    by_choice = {(e.zero, e.microbatches): e for e in exps}
    rows = {}
    for label, choice in choices.items():
        key = (choice["zero"], choice["microbatches"])
        rec, exp, plan = recs[label], by_choice.get(key), plans.get(key)
        step_s = rec["metrics"].get("step_time_median_s") if rec["status"] == "ok" else None
        rows[label] = {**choice, "status": rec["status"], "reason": rec.get("reason"),
                       "predicted_step_s": plan.estimate.step_time_s if plan else None,
                       "harness_step_s": step_s, "harness_samples_per_s": base["batch_size"] / step_s if step_s else None,
                       "autotuner_step_s": exp.latency_s if exp else None,
                       "autotuner_samples_per_s": exp.throughput if exp else None}
    result = {"cell": base, "picks": rows, "autotuner_experiments": [asdict(e) for e in exps],
              "planner_ranking": [{"zero": z, "microbatches": m, "predicted_step_s": p.estimate.step_time_s}
                                  for (z, m), p in plans.items()]}
    (workdir / "comparison.json").write_text(json.dumps(result, indent=1))
    return result


def _ms(x: float | None) -> str:
    return f"{x * 1e3:9.1f}" if x else f"{'-':>9}"


def format_table(result: dict[str, Any]) -> str:
    """Both picks side by side (step times in ms, throughputs in samples/s),
    then the autotuner's whole grid as it timed it."""
    lines = [f"{'pick':<10} {'zero':>4} {'m':>2} {'predicted':>9} {'harness':>9} {'samples/s':>9} "
             f"{'autotuner':>9} {'samples/s':>9}"]
    for label, r in result["picks"].items():
        hs, at = r["harness_samples_per_s"], r["autotuner_samples_per_s"]
        lines.append(f"{label:<10} {r['zero']:>4} {r['microbatches']:>2} {_ms(r['predicted_step_s'])} "
                     f"{_ms(r['harness_step_s'])} {hs or 0:9.2f} {_ms(r['autotuner_step_s'])} {at or 0:9.2f}"
                     + ("" if r["status"] == "ok" else f"  harness: {r['status']} {r['reason']}"))
    grid = sorted(result["autotuner_experiments"], key=lambda e: -(e["throughput"] or 0))
    lines.append("autotuner grid, its timing (zero, m: samples/s): "
                 + ", ".join(f"z{e['zero']} m{e['microbatches']}: {e['throughput'] or 0:.2f}" for e in grid))
    return "\n".join(lines)


def train(argv: list[str]) -> None:
    """The training script each autotuner experiment launches on every rank;
    the engine exits by itself after ``end_profile_step`` (profile runs: after
    the first forward)."""
    import deepspeed
    import torch

    from impl.model import build_model, lm_loss
    from impl.model_config import PRESETS

    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args(argv)
    cell = json.loads(Path("cell.json").read_text())
    cfg = PRESETS[cell["model"]]
    model = build_model(cfg, 0)
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    mb, gen = engine.train_micro_batch_size_per_gpu(), torch.Generator().manual_seed(engine.global_rank)
    for _ in range(engine.gradient_accumulation_steps() * (PROFILE_STEPS[1] + 2)):
        x = torch.randint(0, cfg.vocab_size, (mb, cell["seq_len"] + 1), generator=gen)
        loss = lm_loss(engine(x[:, :-1]), x[:, 1:])
        engine.backward(loss)
        engine.step()
    raise SystemExit("the engine did not stop after end_profile_step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="small")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    result = compare(a.out, base_cell(a.model, a.world_size, a.batch_size, a.seq_len))
    print(format_table(result))


if __name__ == "__main__":
    if "--deepspeed_config" in sys.argv:
        sys.path[0] = str(REPO)  # launched as a script path: bench/ must not shadow top-level modules
        train(sys.argv[1:])
    else:
        main()
