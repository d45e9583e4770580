"""`bench validate` and `bench run`: load a suite, check or run its cells."""
from __future__ import annotations

import tempfile
from pathlib import Path

from bench.cli.output import console, err_console
from bench.config.suite import MAX_CELLS, SuiteError, load_suite


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
    if args.repeat is not None:
        if not 1 <= args.repeat <= 1000:
            err_console.print(f"error: --repeat = {args.repeat}: launches per cell must be in 1..1000")
            return 2
        suite = suite.model_copy(update={"repeat": args.repeat})
    if args.cell:
        unknown = sorted(set(args.cell) - {c.id for c in cells})
        if unknown:
            err_console.print(f"error: --cell {', '.join(unknown)}: no such cell in {args.suite} "
                              f"(`bench validate {args.suite}` lists the ids)")
            return 2
        cells = [c for c in cells if c.id in set(args.cell)]
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
    run_dir = results_root / suite.name
    if args.resume and not ((run_dir / f"{args.resume}.jsonl").exists() or (run_dir / f".{args.resume}").is_dir()):
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
    runner = Runner(suite, cells, results_root=results_root, run_id=run_id, launcher=launcher, progress=not args.no_progress,
                    suite_file=args.suite)
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
        if m and len(m.get("launches") or []) > 1:
            low, high = m["step_time_ci_s"]
            extra += (f" [{low * 1e3:.1f}, {high * 1e3:.1f}] over {len(m['launches'])} launches, "
                      f"CV {m['launch_cv']:.0%}{' UNSTABLE' if m['unstable'] else ''}")
        console.print(f"  {rec['status']:<11} {rec['cell_id']} {rec['adapter']:<10} {extra}", highlight=False)

    from bench.run.stop import Stopped, guard

    try:
        with guard.installed():
            summary = runner.run(on_record=show)
    except Stopped as exc:
        kept = len(runner.run_file.records()) if runner.run_file.path.exists() else 0
        err_console.print(f"stopped by {exc}: no further launch; the running one was killed and not recorded\n"
                          f"  the {kept} record(s) in {runner.run_file.path} are whole\n"
                          f"  continue with: bench run {args.suite} --results {results_root} "
                          f"--resume {runner.run_file.run_id}", soft_wrap=True)
        return exc.exit_code
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
                      f"median {summary.fixed_cost_median_s:.2f} s over {len(summary.fixed_costs_s)} launches "
                      f"(launcher {summary.launcher}"
                      + (f"; its fork server imported once in {summary.launcher_warm_s:.1f} s"
                         if summary.launcher_warm_s is not None else "") + ")", highlight=False)
    console.print(f"results: {summary.run_file.path}", highlight=False)
    return 0
