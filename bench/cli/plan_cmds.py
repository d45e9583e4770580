"""`bench plan` and `bench calibrate`: the auto-parallelism planner and the machine profile it reads."""
from __future__ import annotations

from bench.cli.output import console, err_console


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
