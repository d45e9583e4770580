"""`bench`: run, validate, report, compare, history, export, theory, list, doctor."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.config.suite import MAX_CELLS, SuiteError, load_suite

console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="TrainBench: efficient-training techniques, measured alike.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a suite (one torchrun per cell)")
    p.add_argument("suite")
    p.add_argument("--results", default="results", help="results root (default: results/)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue RUN_ID, skipping cells it already recorded")
    p.add_argument("--run-id", help="name the run (default: UTC timestamp + random suffix)")
    p.add_argument("--force", action="store_true", help=f"allow more than {MAX_CELLS} cells")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--launcher", choices=["local", "slurm"], help="override the suite's launcher")
    p.add_argument("--dry-run", action="store_true", help="slurm: write and print the sbatch scripts, submit nothing")
    p.add_argument("--node-rank", type=int, default=0, help="nodes > 1, launcher local: this node's rank (same --run-id on every node)")
    p.add_argument("--simulate-nodes", action="store_true", help="nodes > 1: start every node's torchrun agent on this host")

    p = sub.add_parser("validate", help="check a suite and print its expanded cells")
    p.add_argument("suite")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("report", help="write the HTML report of a run")
    p.add_argument("results", help="a run's .jsonl, a suite folder (newest run) or the results root")
    p.add_argument("--out", default="reports", help="reports root (default: reports/)")

    p = sub.add_parser("export", help="flatten records to CSV")
    p.add_argument("results")
    p.add_argument("--csv", action="store_true", required=True)
    p.add_argument("-o", "--output", help="file to write (default: stdout)")

    p = sub.add_parser("theory", help="print the papers' predictions")
    p.add_argument("kind", choices=["memory", "comm"])
    p.add_argument("--params", type=float, required=True, help="Ψ, e.g. 7.5e9")
    p.add_argument("--dp", type=int, required=True, help="data-parallel ranks N_d")
    p.add_argument("--optimizer", default="adamw")

    p = sub.add_parser("compare", help="regressions of CANDIDATE against BASE (exit 1 on regression)")
    p.add_argument("base", help="a run's .jsonl or a suite folder (newest run)")
    p.add_argument("candidate")
    p.add_argument("--time-threshold", type=float, default=0.05, help="step-time ratio past 1 that counts (default 0.05)")
    p.add_argument("--mem-threshold", type=float, default=0.02, help="memory/comm ratio past 1 that counts (default 0.02)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance of the Mann-Whitney U test (default 0.05)")
    p.add_argument("--md", help="also write the markdown summary here")
    p.add_argument("--html", help="also write an HTML summary here")

    p = sub.add_parser("history", help="per-metric trends across runs, with step detection (HTML page)")
    p.add_argument("results_dir", help="a suite folder (its runs) or the results root (every suite's runs)")
    p.add_argument("--out", default="reports", help="reports root; writes OUT/<folder name>/history.html")
    p.add_argument("--time-threshold", type=float, default=0.05, help="relative change of step time and tokens/s that can be a step")
    p.add_argument("--mem-threshold", type=float, default=0.02, help="relative change of memory/comm bytes that can be a step")
    p.add_argument("--alpha", type=float, default=0.05, help="significance of the Mann-Whitney U test, before Bonferroni")

    p = sub.add_parser("explain", help="why two cells differ: breakdown, collectives, memory, timelines (needs `profile`)")
    p.add_argument("results", help="a run's .jsonl or a suite folder (newest run)")
    p.add_argument("cell_a", help="cell id, unique id prefix, or label")
    p.add_argument("cell_b")
    p.add_argument("--out", default="reports", help="reports root; writes OUT/<suite>/<run>/explain-A-B.html")

    p = sub.add_parser("plan", help="auto-parallelism: rank dp×tp×pp/micro-batch/ZeRO/offload/checkpointing plans")
    p.add_argument("--model", required=True, help="model preset, e.g. llama-7b")
    p.add_argument("--gpus", type=int, required=True, help="devices (ranks) the job uses")
    p.add_argument("--gpu-mem-gib", type=float, help="memory per device (GiB); plans over it are pruned")
    p.add_argument("--batch-size", type=int, help="global batch in sequences (default 4 × gpus)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048 on cuda, 128 on cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpu-type", help="GPU name for the peak table when no profile is given (default H100 SXM)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--adapter", choices=["inhouse", "torch", "deepspeed", "colossalai"],
                   help="only plans this adapter runs (default: any adapter)")
    p.add_argument("--profile", help="machine profile JSON (bench calibrate); default: see README")
    p.add_argument("--max-microbatches", type=int, default=32)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--emit-suite", metavar="OUT.yaml", help="write a suite measuring the top plans")

    p = sub.add_parser("calibrate", help="measure this machine for the planner (matmul, memory, collectives)")
    p.add_argument("--out", help="profile JSON (default results/machine_profiles/<host>.json)")
    p.add_argument("--ranks", default="2", help="comma-separated group sizes for the collectives (default 2)")

    sub.add_parser("list", help="adapter × technique support matrix")
    sub.add_parser("doctor", help="what is installed, the device, and why an adapter is unavailable")

    args = parser.parse_args(argv)
    return {
        "run": cmd_run, "validate": cmd_validate, "report": cmd_report, "export": cmd_export,
        "theory": cmd_theory, "list": cmd_list, "doctor": cmd_doctor, "compare": cmd_compare, "history": cmd_history,
        "explain": cmd_explain, "plan": cmd_plan, "calibrate": cmd_calibrate,
    }[args.command](args)


def cmd_plan(args) -> int:
    from bench.plan.planner import cmd_plan as plan

    return plan(args, console)


def cmd_calibrate(args) -> int:
    from bench.plan.calibrate import calibrate, default_profile_path

    try:
        sizes = tuple(int(x) for x in args.ranks.split(","))
    except ValueError:
        err_console.print(f"error: --ranks {args.ranks!r}: expected comma-separated integers")
        return 2
    profile = calibrate(args.out, group_sizes=sizes)
    console.print(f"{profile.source}\nprofile: {args.out or default_profile_path()}", soft_wrap=True)
    return 0


def _load(path: str, force: bool):
    try:
        return load_suite(path, max_cells=10**9 if force else MAX_CELLS)
    except SuiteError as exc:
        err_console.print(f"error: {exc}")
        return None


def cmd_validate(args) -> int:
    loaded = _load(args.suite, args.force)
    if loaded is None:
        return 2
    suite, cells = loaded
    from bench import adapters

    from bench.plan.fit import available_bytes, describe, fit_reason
    from bench.config.knobs import Knobs

    console.print(f"{suite.name}: {len(cells)} cells (steps={suite.steps}, warmup={suite.warmup}, "
                  f"timeout_s={suite.timeout_s:g}, launcher={suite.launcher}, nodes={suite.nodes}"
                  f"{f' × {suite.nproc_per_node}' if suite.nproc_per_node else ''})", highlight=False)
    base = Knobs(world_size=1).resolved()
    shown = ("adapter", "world_size", "dp", "tp", "pp")
    for c in cells:
        k = c.knobs.resolved()
        diff = " ".join(f"{n}={v}" for n, v in k.items() if n not in shown and v != base[n])
        verdict = adapters.why_not(c.knobs) or fit_reason(c.knobs, available_bytes(suite, c.knobs.device))
        console.print(
            f"{c.index:>4} {c.id} {c.label:<15} {k['adapter']:<10} ws={k['world_size']} dp={k['dp']} tp={k['tp']} "
            f"pp={k['pp']} {diff}\n       -> {'runs' if not verdict else 'unsupported: ' + verdict}"
            f"\n       {describe(c.knobs, available_bytes(suite, c.knobs.device))}",
            highlight=False, soft_wrap=True,
        )
    return 0


def cmd_run(args) -> int:
    loaded = _load(args.suite, args.force)
    if loaded is None:
        return 2
    suite, cells = loaded
    from bench.run.results import ResultsWriteError, RunInUse, check_run_id
    from bench.run.runner import Runner

    run_id = args.resume or args.run_id
    try:
        if run_id:
            check_run_id(run_id)
    except ValueError as exc:
        err_console.print(f"error: {exc}")
        return 2
    results_root = Path(args.results)
    if args.resume and not (results_root / suite.name / f"{args.resume}.jsonl").exists():
        err_console.print(f"error: --resume {args.resume}: no such run under {results_root / suite.name}")
        return 2
    try:
        results_root.mkdir(parents=True, exist_ok=True)
        # A probe of this process's own: two runners sharing a results folder
        # must not unlink each other's probe.
        with tempfile.NamedTemporaryFile(dir=results_root, prefix=".write-test-"):
            pass
    except OSError as exc:
        err_console.print(f"error: results directory {results_root} is not writable: {exc}", soft_wrap=True)
        return 2
    from bench.run.launchers.choose import make_launcher

    if args.launcher:
        suite = suite.model_copy(update={"launcher": args.launcher})
    try:
        launcher = make_launcher(suite, node_rank=args.node_rank, simulate_nodes=args.simulate_nodes,
                                 dry_run=args.dry_run, echo=print)
    except (ValueError, FileNotFoundError) as exc:
        err_console.print(f"error: {exc}", soft_wrap=True)
        return 2
    runner = Runner(suite, cells, results_root=results_root, run_id=run_id, launcher=launcher, progress=not args.no_progress)
    if args.dry_run:
        for cell in cells:
            prepared = runner.prepare(cell)
            if isinstance(prepared, dict):
                console.print(f"# {cell.id}: {prepared['status']}: {prepared['reason']}", soft_wrap=True)
                continue
            launcher.launch(payload=prepared[0] / "payload.json", world_size=cell.knobs.world_size,
                            timeout_s=suite.timeout_s, env=prepared[1])
        console.print(f"dry run: {len(cells)} cell(s), nothing submitted, no record written", highlight=False)
        return 0

    def show(rec) -> None:
        m = rec["metrics"] or {}
        extra = f"{m['step_time_median_s'] * 1e3:.1f} ms/step" if m else (rec["reason"] or "")[:160]
        console.print(f"  {rec['status']:<11} {rec['cell_id']} {rec['adapter']:<10} {extra}", highlight=False)

    try:
        summary = runner.run(on_record=show)
    except RunInUse as exc:
        err_console.print(f"error: {exc}", soft_wrap=True)
        return 2
    except ResultsWriteError as exc:
        path = runner.run_file.path
        try:
            kept = str(len(runner.run_file.records()))
        except OSError:
            kept = "unknown number of"
        err_console.print(f"error: results could not be written, so the suite stopped: {exc.strerror}\n"
                          f"  the {kept} record(s) already in {path} are intact (no partial line)\n"
                          f"  fix the space or permissions, then continue with: bench run {args.suite} "
                          f"--results {results_root} --resume {runner.run_file.run_id}", soft_wrap=True)
        return 3
    counts = ", ".join(f"{k}={v}" for k, v in sorted(summary.counts.items())) or "nothing new"
    console.print(f"run {summary.run_file.run_id}: {counts}; {summary.skipped} already recorded", highlight=False)
    if summary.fixed_cost_median_s is not None:
        console.print(f"fixed per-cell cost (launch + imports + set-up + warm-up, timed steps excluded): "
                      f"median {summary.fixed_cost_median_s:.2f} s over {len(summary.fixed_costs_s)} cells", highlight=False)
    console.print(f"results: {summary.run_file.path}", highlight=False)
    return 0


def cmd_report(args) -> int:
    from bench.analysis.report import write_report
    from bench.run.results import resolve_results

    try:
        files = resolve_results(args.results)
    except FileNotFoundError as exc:
        err_console.print(f"error: {exc}")
        return 2
    for f in files:
        try:
            _check_report_names(f)
        except ValueError as exc:
            err_console.print(f"error: {f}: {exc}; no report written", soft_wrap=True)
            return 2
        out = write_report(f, Path(args.out))
        console.print(f"report: {out}", highlight=False)
    return 0


def cmd_explain(args) -> int:
    from bench.analysis.explain import compare, config_diff, find_cell, page_name, write_page
    from bench.run.results import read_records, resolve_results

    try:
        path = resolve_results(args.results)[-1]
        _check_report_names(path)
        records = list(read_records(path))
        a, b = find_cell(records, args.cell_a), find_cell(records, args.cell_b)
    except (FileNotFoundError, ValueError) as exc:  # ExplainError is a ValueError
        err_console.print(f"error: {exc}", soft_wrap=True)
        return 2
    table = Table(title=f"A = {a['cell_id']}  vs  B = {b['cell_id']}")
    for col in ("quantity", "A", "B", "B ÷ A"):
        table.add_column(col)
    for k, va, vb in config_diff(a, b):
        table.add_row(f"knob {k}", str(va), str(vb), "")
    rows = compare(a, b)
    for r in rows:
        table.add_row(r["quantity"], r["a"], r["b"], r["ratio"])
    console.print(table)
    # The readings as whole lines (a table column would wrap them mid-sentence on a narrow terminal).
    for r in rows:
        if r["reading"]:
            console.print(f"- {r['quantity']}: {r['reading']}", soft_wrap=True)
    out = write_page(a, b, Path(args.out) / a["suite"] / a["run_id"] / page_name(a, b))
    console.print(f"explain: {out}", highlight=False)
    return 0


def _check_report_names(results_file: Path) -> None:
    """The report's folder is named by the records' suite and run id: a record
    written by hand could otherwise steer it out of the reports root."""
    from bench.run.results import check_run_id, check_suite_name, read_records

    for rec in read_records(results_file):
        check_suite_name(rec.get("suite"))
        check_run_id(str(rec.get("run_id")))
        return


def cmd_compare(args) -> int:
    from bench.analysis.compare import compare, html_page, markdown
    from bench.run.results import resolve_results

    try:
        (base,), (cand,) = resolve_results(args.base), resolve_results(args.candidate)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"error: {exc}")
        return 2
    findings = compare(base, cand, time_threshold=args.time_threshold, mem_threshold=args.mem_threshold, alpha=args.alpha)
    if not findings:
        err_console.print(f"error: no cell of {cand} matches a cell of {base}")
        return 2
    text = markdown(findings)
    print(text)  # plain: a markdown table must not be re-wrapped
    if args.md:
        Path(args.md).write_text(text)
    if args.html:
        Path(args.html).write_text(html_page(findings, base, cand))
    return 1 if any(f.regressed for f in findings) else 0


def cmd_history(args) -> int:
    from bench.analysis.history import write_history

    folder = Path(args.results_dir)
    thresholds = {"step_time_s": args.time_threshold, "tokens_per_s": args.time_threshold,
                  "peak_mem_bytes": args.mem_threshold, "comm_bytes_per_step": args.mem_threshold}
    try:
        out, runs, steps = write_history(folder, Path(args.out) / folder.resolve().name / "history.html",
                                         thresholds=thresholds, alpha=args.alpha)
    except FileNotFoundError as exc:
        err_console.print(f"error: {exc}")
        return 2
    for st in steps:
        console.print(f"step: {st.suite} {st.label} ({st.key}) {st.metric} {st.change:+.1%} at run {runs[st.run].run_id} "
                      f"(after {runs[st.previous_run].run_id})", highlight=False)
    console.print(f"{len(steps)} step(s); history: {out}", highlight=False)
    return 0


def cmd_export(args) -> int:
    import pandas as pd

    from bench.run.results import flatten, read_records, resolve_results

    rows = [flatten(r) for f in resolve_results(args.results) for r in read_records(f)]
    frame = pd.DataFrame(rows)
    if args.output:
        frame.to_csv(args.output, index=False)
    else:
        frame.to_csv(sys.stdout, index=False)
    return 0


def cmd_theory(args) -> int:
    from bench import theory

    gb = 1e9
    if args.kind == "memory":
        table = Table(title=f"model-state memory per rank, Ψ = {args.params:.3g}, N_d = {args.dp}, {args.optimizer} (GB = 1e9 bytes)")
        table.add_column("precision")
        for stage in range(4):
            table.add_column(f"ZeRO-{stage}" if stage else "baseline (DDP)", justify="right")
        for precision in ("fp16", "bf16", "fp32"):
            row = [precision]
            for stage in range(4):
                s = theory.model_state_bytes(args.params, zero=stage, dp=args.dp, precision=precision, optimizer=args.optimizer)
                row.append(f"{sum(s.values()) / gb:.2f}")
            table.add_row(*row)
    else:
        table = Table(title=f"communication per rank per step, Ψ = {args.params:.3g}, N_d = {args.dp} (bus bytes, GB)")
        for col in ("stage", "elements", "fp32 bytes", "16-bit bytes"):
            table.add_column(col, justify="right")
        for stage in range(4):
            el = theory.dp_comm_elements(args.params, zero=stage, dp=args.dp)
            table.add_row(f"ZeRO-{stage}" if stage else "DDP", f"{el:.4g}", f"{4 * el / gb:.2f}", f"{2 * el / gb:.2f}")
    console.print(table)
    return 0


def cmd_list(args) -> int:
    from bench import adapters
    from bench.config.techniques import TECHNIQUES

    table = Table(title="adapter × technique (ok | cpu-only/cuda-only | unsupported: reason)")
    table.add_column("technique")
    names = adapters.names()
    for n in names:
        table.add_column(n)
    for t in TECHNIQUES:
        row = [t.name]
        for n in names:
            caps = adapters.get(n).capabilities
            devices = caps.runs.get(t.name)
            if devices is None:
                row.append(f"unsupported: {caps.reasons.get(t.name, 'not implemented')}")
            elif devices == frozenset({"cpu", "cuda"}):
                row.append("ok")
            else:
                missing = sorted({"cpu", "cuda"} - devices)
                row.append(f"{'/'.join(sorted(devices))} only; {'/'.join(missing)}: {caps.reasons.get(t.name, 'not implemented')}")
        table.add_row(*row)
    console.print(table)
    return 0


def cmd_doctor(args) -> int:
    from bench import adapters
    from bench.run.results import environment

    env = environment()
    console.print(f"host {env['host']}, cpu {env['cpu']} × {env['cpu_count']}, python {env['versions']['python']}", highlight=False)
    for pkg, ver in env["versions"].items():
        console.print(f"  {pkg:<13} {ver or 'not installed'}", highlight=False)
    try:
        import torch

        if torch.cuda.is_available():
            console.print(f"device: cuda × {torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})", highlight=False)
        else:
            console.print("device: cpu only (no CUDA device visible)", highlight=False)
    except ImportError:
        console.print("device: unknown (torch is not installed)")
    for n in adapters.names():
        why = adapters.get(n).unavailable_reason()
        console.print(f"adapter {n:<11} {'available' if why is None else 'unavailable: ' + why}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
