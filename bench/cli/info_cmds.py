"""`bench theory`, `list`, `doctor`: what the papers predict, what each adapter supports, what is installed."""
from __future__ import annotations

from rich.table import Table

from bench.cli.output import console


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
    table.add_column("technique", no_wrap=True)  # the row key stays readable however narrow the terminal
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
