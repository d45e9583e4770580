"""`bench report`, `explain`, `compare`, `history`, `export`: read recorded runs."""
from __future__ import annotations

import sys
from pathlib import Path

from rich.table import Table

from bench.cli.output import console, err_console


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
        try:
            out = write_report(f, Path(args.out))
        except ValueError as exc:  # no readable record
            err_console.print(f"error: {exc}; no report written", soft_wrap=True)
            return 2
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
    from bench.analysis.compare import compare
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
    return _verdicts(findings, args, base, cand)


def cmd_ab(args) -> int:
    """A/B inside one run: the cells with KNOB = BASE against those with KNOB = CAND
    (measured interleaved in one session, which is what removes drift)."""
    from bench.analysis.compare import compare_records, split_run
    from bench.config.knobs import KNOB_NAMES
    from bench.run.results import read_records, resolve_results

    if args.knob not in KNOB_NAMES:
        err_console.print(f"error: --knob {args.knob!r} is not a knob (knobs: {', '.join(KNOB_NAMES)})")
        return 2
    try:
        (run,) = resolve_results(args.run)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"error: {exc}")
        return 2
    base, cand = split_run(list(read_records(run)), args.knob, args.base, args.cand)
    findings = compare_records(base, cand, time_threshold=args.time_threshold, mem_threshold=args.mem_threshold,
                               alpha=args.alpha, ignore=(args.knob,))
    if not findings:
        err_console.print(f"error: no cell with {args.knob} = {args.cand} in {run} matches one with "
                          f"{args.knob} = {args.base}")
        return 2
    return _verdicts(findings, args, Path(f"{run.name}:{args.knob}={args.base}"), Path(f"{run.name}:{args.knob}={args.cand}"))


def _verdicts(findings, args, base: Path, cand: Path) -> int:
    from bench.analysis.compare import html_page, markdown

    text = markdown(findings)
    print(text)  # plain: a markdown table must not be re-wrapped
    for path, content in ((args.md, lambda: text), (args.html, lambda: html_page(findings, base, cand))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content())
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
