"""`bench`: run, validate, report, compare, history, export, theory, list, doctor."""
from __future__ import annotations

import argparse

from bench.cli.analysis_cmds import cmd_ab, cmd_compare, cmd_explain, cmd_export, cmd_history, cmd_report
from bench.cli.info_cmds import cmd_doctor, cmd_list, cmd_theory
from bench.cli.plan_cmds import cmd_calibrate, cmd_plan
from bench.cli.run_cmds import cmd_run, cmd_validate
from bench.config.suite import MAX_CELLS


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
    p.add_argument("--repeat", type=int, help="launches per cell (overrides the suite's repeat)")
    p.add_argument("--cell", action="append", metavar="CELL_ID",
                   help="run only this cell (repeatable; ids as in results and reports)")
    p.add_argument("--launcher", choices=["local", "warm", "torchrun", "slurm"],
                   help="override the suite's launcher (local: warm fork server on one node, torchrun agents across nodes)")
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
    p.add_argument("--alpha", type=float, default=0.01, help="significance of the exact one-sided Mann-Whitney U test on launch medians (default 0.01)")
    p.add_argument("--md", help="also write the markdown summary here")
    p.add_argument("--html", help="also write an HTML summary here")

    p = sub.add_parser("ab", help="A/B inside one run: cells with KNOB=BASE against KNOB=CAND (exit 1 on regression)")
    p.add_argument("run", help="a run's .jsonl (measure both variants in one suite, with repeat)")
    p.add_argument("--knob", required=True, help="the knob the variants differ in, e.g. adapter, fault, zero")
    p.add_argument("--base", required=True, help="its value on the base side")
    p.add_argument("--cand", required=True, help="its value on the candidate side")
    p.add_argument("--time-threshold", type=float, default=0.05)
    p.add_argument("--mem-threshold", type=float, default=0.02)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--md")
    p.add_argument("--html")

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
    p.add_argument("--adapter", choices=["inhouse", "torch", "deepspeed", "colossalai", "megatron"],
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
        "theory": cmd_theory, "list": cmd_list, "doctor": cmd_doctor, "compare": cmd_compare, "ab": cmd_ab, "history": cmd_history,
        "explain": cmd_explain, "plan": cmd_plan, "calibrate": cmd_calibrate,
    }[args.command](args)
