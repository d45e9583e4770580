"""`bench plan` and `strategy: auto`: the planner (``bench.plan``) at the harness's door.

* ``bench plan`` prints the top plans for a model on N devices and can write a
  suite that measures them (``predict: true``, so each record carries its
  prediction beside the measurement).
* A suite cell with ``strategy: auto`` is resolved at expansion, before
  anything launches, into the planner's best plan for the cell's world size,
  model, batch, sequence, precision, optimizer and adapter; the chosen knobs are
  the cell's knobs (validated like any cell) and ``notes["plan"]`` records the
  choice, the prediction, the profile and how many plans were considered.
* ``validation`` compares predictions with measurements (report section).

Top-level imports stay torch- and impl-free: the report imports this module.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

ADAPTER_ORDER = ("inhouse", "torch", "deepspeed", "colossalai")
DEFAULT_GPU = "H100 SXM"


def load_profile(device: str, path: str | None = None, gpu_type: str | None = None, *, echo=None
                 ) -> tuple[Any, Path | None]:
    """The machine profile and the file it is kept in: ``path`` if given; on CPU
    this host's calibrated profile (results/machine_profiles/<host>.json,
    calibrated now when absent or of an older version, ~10–60 s); on GPU a
    calibrated profile if ``path`` names one, else the peak-table default with
    the documented α–β (no file)."""
    from bench.plan.calibrate import calibrate, default_profile_path
    from bench.plan.machine import PROFILE_VERSION, MachineProfile, default_gpu_profile

    if path:
        return MachineProfile.load(path), Path(path)
    if device == "cpu":
        default = default_profile_path()
        if default.exists() and MachineProfile.stored_version(default) == PROFILE_VERSION:
            return MachineProfile.load(default), default
        if echo:
            echo(f"no current machine profile at {default}: calibrating this machine (about 10–60 s)")
        return calibrate(default), default
    return default_gpu_profile(gpu_type or _visible_gpu() or DEFAULT_GPU), None


def layer_profiler(profile: Any, save_to: Path | None, *, echo=None):
    """The search's ``prepare`` for a CPU profile: time the model's pieces at
    every (tp, micro-batch) shape the feasible plans run that the profile lacks
    (``bench.plan.layer_profile``; one torchrun, saved with the profile,
    so each shape is measured once per machine)."""
    from bench.plan.layer_profile import ensure_layer_profile, zero_probed

    def prepare(plans: list[Any]) -> None:
        groups: dict[tuple, tuple[set[tuple[int, int]], set[tuple[int, int]]]] = {}
        for k in plans:
            key = (k.model, k.seq_len, k.world_size, k.optimizer)
            shapes, zero_shapes = groups.setdefault(key, (set(), set()))
            b = k.batch_size // (k.dp * k.microbatches)
            shapes.add((k.tp, b))
            if zero_probed(k):
                zero_shapes.add((k.zero, b))
        for (model, seq_len, ranks, optimizer), (shapes, zero_shapes) in groups.items():
            if echo and profile.device == "cpu":
                echo(f"layer profile: {model} seq {seq_len} at {ranks} ranks, up to {len(shapes)} shapes"
                     f"{f' and {len(zero_shapes)} ZeRO probes' if zero_shapes else ''}")
            ensure_layer_profile(profile, model=model, seq_len=seq_len, ranks=ranks, shapes=shapes,
                                 optimizer=optimizer, save_to=save_to, zero_shapes=zero_shapes)

    return prepare


def _visible_gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def _why_not_any(adapter: str | None):
    """The capability check a plan must pass: one adapter's, or any adapter's (None)."""
    from bench import adapters

    if adapter is not None:
        return adapters.why_not
    return lambda knobs: None if first_adapter(knobs) else "no adapter runs this plan"


def first_adapter(knobs: Any) -> str | None:
    from bench import adapters

    for name in ADAPTER_ORDER:
        if adapters.why_not(knobs.model_copy(update={"adapter": name})) is None:
            return name
    return None


def plan_record(plan: Any, profile: Any, considered: int, feasible: int) -> dict[str, Any]:
    return {**plan.as_dict(), "profile": profile.source, "considered": considered, "feasible": feasible}


def attach(knobs: Any, run: Any) -> tuple[Any, dict[str, Any] | None]:
    """At suite expansion: resolve ``strategy: auto`` into the best plan, or
    (``predict: true``) attach the prediction to a manual cell. Raises
    ``ValueError`` naming the field when no plan is feasible."""
    if knobs.workload != "train" or (knobs.strategy != "auto" and not getattr(run, "predict", False)):
        return knobs, None
    from bench import adapters
    from bench.plan.fit import available_bytes
    from bench.plan.cost_model import estimate
    from bench.plan.search import Plan, search

    profile, path = load_profile(knobs.device, getattr(run, "machine_profile", None))
    prepare = layer_profiler(profile, path)
    if knobs.strategy != "auto":
        # every shape of this cell's search space at once: the suite's other
        # predicted cells (the rest of a plan matrix) then find theirs measured
        prepare(search_space_knobs(knobs))
        return knobs, plan_record(Plan(knobs, estimate(knobs, profile)), profile, 1, 1)
    budget = available_bytes(run, knobs.device)
    result = search(knobs.resolved(), profile, memory_budget_bytes=budget, why_not=adapters.why_not,
                    prepare=prepare)
    if not result.plans:
        why = "; ".join(f"{n}× {r} (e.g. {result.examples[r]})" for r, n in result.pruned.most_common(3))
        raise ValueError(f"strategy = 'auto': none of {result.considered} plans is feasible: {why}")
    best = result.plans[0]
    return best.knobs, plan_record(best, profile, result.considered, len(result.plans))


def search_space_knobs(knobs: Any) -> list[Any]:
    """This cell and the valid knobs of every plan the search would consider for its
    model, world size, batch and sequence (for measuring their layer shapes)."""
    from pydantic import ValidationError

    from bench.config.knobs import Knobs
    from bench.plan.search import candidates
    from impl.model_config import PRESETS

    out = [knobs]
    # ZeRO 0, 2 and 3 differ in what is measured (2 and 3: the in-place probe); 1 and offload do not
    space = {"zero": [0, 2, 3], "offload": ["none"], "checkpointing": ["none"]}
    for overlay in candidates(knobs.resolved(), PRESETS[knobs.model], space=space):
        try:
            out.append(Knobs.model_validate(overlay))
        except ValidationError:
            continue
    return out


def emit_suite(path: str | Path, plans: list[Any], base: dict[str, Any], *, profile_path: str | None,
               memory_gib: float | None) -> Path:
    """A suite measuring the plans, each with its prediction attached (``predict: true``)."""
    import yaml

    include = []
    for p in plans:
        entry = {k: v for k, v in p.choice().items()}
        entry["adapter"] = first_adapter(p.knobs) if base.get("adapter") is None else base["adapter"]
        include.append(entry)
    defaults = {k: v for k, v in base.items() if k != "adapter" and v is not None}
    suite: dict[str, Any] = {"name": f"plan-{base['model']}-{base['world_size']}".replace(".", "_"),
                             "description": "top plans of `bench plan`, measured against their predictions",
                             "steps": 10, "warmup": 2, "predict": True, "defaults": defaults, "include": include}
    if profile_path:
        suite["machine_profile"] = str(profile_path)
    if memory_gib is not None:
        suite["device_memory_gib"] = memory_gib
    path = Path(path)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def cmd_plan(args, console) -> int:
    from rich.table import Table

    from bench.config.knobs import Knobs
    from bench.plan.search import search
    from impl.model_config import PRESETS

    if args.model not in PRESETS:
        console.print(f"error: --model {args.model!r}: unknown preset; known: {', '.join(PRESETS)}")
        return 2
    if args.gpus < 1:
        console.print(f"error: --gpus {args.gpus}: must be at least 1")
        return 2
    cfg = PRESETS[args.model]
    device = args.device
    base = {"model": args.model, "world_size": args.gpus, "device": device,
            "batch_size": args.batch_size or 4 * args.gpus,
            "seq_len": args.seq_len or min(2048 if device == "cuda" else 128, cfg.max_seq_len),
            "precision": args.precision or ("bf16" if device == "cuda" else "fp32"), "optimizer": args.optimizer,
            "adapter": args.adapter}
    try:
        Knobs.model_validate({k: v for k, v in base.items() if k != "adapter"} | {"adapter": args.adapter or "inhouse"})
        profile, profile_path = load_profile(device, args.profile, args.gpu_type, echo=console.print)
    except ValueError as exc:
        console.print(f"error: {exc}")
        return 2
    budget = args.gpu_mem_gib * 2**30 if args.gpu_mem_gib else None
    search_base = {k: v for k, v in base.items() if k != "adapter"} | {"adapter": args.adapter or "inhouse"}
    result = search(search_base, profile, memory_budget_bytes=budget, why_not=_why_not_any(args.adapter),
                    max_microbatches=args.max_microbatches,
                    prepare=layer_profiler(profile, profile_path, echo=console.print))
    console.print(f"profile: {profile.source}", soft_wrap=True)
    console.print(f"{result.considered} plans considered, {len(result.plans)} feasible"
                  f"{f' under {args.gpu_mem_gib:g} GiB per device' if budget else ''}; pruned:", soft_wrap=True)
    for reason, n in result.pruned.most_common():
        console.print(f"  {n:>6} × {reason}  (e.g. {result.examples[reason]})", soft_wrap=True)
    table = Table(title=f"top plans: {args.model} on {args.gpus} × {device}, batch {base['batch_size']} × "
                        f"seq {base['seq_len']}, {base['precision']}, {args.optimizer}")
    for col in ("#", "plan", "step s", "compute", "bubble", "exposed comm", "optimizer", "memory GiB", "adapter"):
        table.add_column(col, justify="left" if col in ("plan", "adapter") else "right")
    top = result.plans[:args.top]
    for i, p in enumerate(top, 1):
        e = p.estimate
        table.add_row(str(i), p.label(), f"{e.step_time_s:.3g}", f"{e.compute_s:.3g}",
                      f"{e.bubble_s:.3g}", f"{e.exposed_comm_s:.3g}", f"{e.optimizer_s:.3g}",
                      f"{e.memory_bytes / 2**30:.2f}", args.adapter or first_adapter(p.knobs) or "—")
    console.print(table)
    if args.emit_suite and top:
        out = emit_suite(args.emit_suite, top, base, profile_path=args.profile, memory_gib=args.gpu_mem_gib)
        console.print(f"suite: {out}")
    return 0 if top else 1


def validation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Predicted vs measured step time and peak memory per cell carrying
    ``notes.plan``; Spearman's ρ over step times, and the measured gap of the
    planner's top-1 (lowest prediction) to the measured best."""
    rows = []
    for r in records:
        plan = (r.get("notes") or {}).get("plan")
        m = r.get("metrics") or {}
        if r.get("status") != "ok" or not plan or m.get("step_time_median_s") is None:
            continue
        pred = plan["predicted"]
        rows.append({"cell": r["cell_id"], "plan": plan["label"], "predicted_ms": pred["step_time_s"] * 1e3,
                     "measured_ms": m["step_time_median_s"] * 1e3,
                     "time_ratio": m["step_time_median_s"] / pred["step_time_s"],
                     "predicted_mem_mib": pred["memory_bytes"] / 2**20,
                     "measured_mem_mib": (m.get("peak_mem_bytes") or math.nan) / 2**20,
                     "mem_ratio": (m.get("peak_mem_bytes") or math.nan) / pred["memory_bytes"]})
    if not rows:
        return None
    out: dict[str, Any] = {"rows": rows, "spearman": None, "top1_gap_pct": None}
    if len(rows) >= 3:
        from scipy.stats import spearmanr

        out["spearman"] = float(spearmanr([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])[0])
    top1 = min(rows, key=lambda r: r["predicted_ms"])
    best = min(rows, key=lambda r: r["measured_ms"])
    out["top1"], out["best"] = top1["cell"], best["cell"]
    out["top1_gap_pct"] = 100 * (top1["measured_ms"] / best["measured_ms"] - 1)
    mem = [abs(r["mem_ratio"] - 1) for r in rows if not math.isnan(r["mem_ratio"])]
    out["mem_max_error_pct"] = 100 * max(mem) if mem else None
    out["mem_median_error_pct"] = 100 * statistics.median(mem) if mem else None
    return out
