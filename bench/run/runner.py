"""Runs a suite: ``repeat`` launches per cell, interleaved across cells,
outcome classification, one record per cell.

A failing cell is a result (unsupported | error | oom | timeout), never the
end of the suite: its first failing launch ends it. A cell's record is written
when its last launch has finished (``bench.run.launch_stats.merge_launches``);
each finished launch is kept in its scratch folder, so a resumed run skips the
cells its file already holds and runs only the missing launches of the others.
The one thing that does stop a suite is a results folder that refuses writes
(``ResultsWriteError``): running on would only lose the records.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import adapters
from bench.run.launchers.base import LaunchOutcome, Launcher
from bench.run.launch_stats import merge_launches
from bench.run.quality import convergence
from bench.run.launchers.warm import WarmLocal
from bench.run.schedule import interleaved
from bench.run.stop import guard
from bench.run.results import SCHEMA_VERSION, ResultsWriteError, RunFile, environment, new_run_id
from bench.config.suite import Cell, Suite
from bench.config.techniques import used_by
from bench.theory import predict, ratios

LAUNCH_RECORD = "launch_record.json"
"""A finished launch's record in its scratch folder: what a resumed run picks up."""
_OOM = re.compile(r"OutOfMemoryError|out of memory|can't allocate memory|MemoryError")


@dataclass
class RunSummary:
    run_file: RunFile
    counts: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    fixed_costs_s: list[float] = field(default_factory=list)
    launcher: str = ""
    launcher_warm_s: float | None = None
    """The warm launcher's one-off import time (its fork server), not in any cell's fixed cost."""

    @property
    def fixed_cost_median_s(self) -> float | None:
        return statistics.median(self.fixed_costs_s) if self.fixed_costs_s else None


class Runner:
    def __init__(self, suite: Suite, cells: list[Cell], *, results_root: Path, run_id: str | None = None,
                 launcher: Launcher | None = None, progress: bool = True, suite_file: str | None = None) -> None:
        self.suite, self.cells = suite, cells
        self.suite_file = suite_file  # as the user named it: the report's repro command
        self.run_file = RunFile(Path(results_root).resolve(), suite.name, run_id or new_run_id())
        self.launcher = launcher or WarmLocal()
        self.progress = progress
        self._env: dict[str, Any] | None = None
        self._cpu_peaks: dict[int, float] = {}

    def run(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        summary = RunSummary(self.run_file, launcher=self.launcher.name)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        try:
            with self.run_file.lock(), Progress(*columns, disable=not self.progress, transient=False) as bar:
                done = {r["cell_id"] for r in self.run_file.records()}
                todo = [c for c in self.cells if c.id not in done]
                summary.skipped = len(self.cells) - len(todo)
                repeat = self.suite.repeat
                task = bar.add_task(self.suite.name, total=len(todo) * repeat)

                def finish(record: dict[str, Any]) -> None:
                    if record["status"] == "ok":  # after merging: time-to-target uses the cell's step time
                        record["metrics"]["convergence"] = convergence(record, record["run"]["quality"])
                    self.run_file.append(record)
                    summary.counts[record["status"]] = summary.counts.get(record["status"], 0) + 1
                    if on_record:
                        on_record(record)

                def complete(cell_id: str) -> None:  # every launch of the cell is in: its record
                    finished = launched.pop(cell_id)
                    finish(merge_launches([finished[i] for i in range(repeat)]))

                launched: dict[str, dict[int, dict[str, Any]]] = {}
                for cell in todo:
                    verdict = self.verdict(cell)
                    if verdict:  # decided before launch: no launch at all
                        finish(verdict)
                        bar.advance(task, repeat)
                    else:
                        launched[cell.id] = self._finished_launches(cell)  # a resumed run keeps what it had
                        bar.advance(task, len(launched[cell.id]))
                        if len(launched[cell.id]) == repeat:  # killed between its last launch and its record
                            complete(cell.id)
                by_id = {c.id: c for c in todo}
                seed = f"{self.suite.seed}:{self.run_file.run_id}"
                queue = interleaved([c.id for c in todo if c.id in launched], repeat, seed)
                last = None
                while True:
                    # failed cells and launches finished before a resume drop out; the next
                    # launch is then the first one left that is not the cell just launched
                    queue = [(c, k) for c, k in queue if c in launched and k not in launched[c]]
                    if not queue:
                        break
                    cell_id, k = queue.pop(next((i for i, (c, _) in enumerate(queue) if c != last), 0))
                    last, cell = cell_id, by_id[cell_id]
                    bar.update(task, description=f"{self.suite.name}: {cell.knobs.adapter} {cell.id} #{k + 1}")
                    record = self.run_launch(cell, k)
                    bar.advance(task)
                    if record["timing"].get("fixed_cost_s") is not None:
                        summary.fixed_costs_s.append(record["timing"]["fixed_cost_s"])
                    if record["status"] != "ok":
                        if repeat > 1:
                            record["reason"] = f"launch {k + 1} of {repeat}: {record['reason']}"
                        del launched[cell_id]
                        finish(record)
                        continue
                    launched[cell_id][k] = record
                    if len(launched[cell_id]) == repeat:
                        complete(cell_id)
        finally:
            close = getattr(self.launcher, "close", None)
            if close:
                summary.launcher_warm_s = getattr(self.launcher, "warm_s", None)
                close()  # the warm launcher's fork server ends with the run
        return summary

    @property
    def env(self) -> dict[str, Any]:
        if self._env is None:
            self._env = environment()
        return self._env

    def run_launch(self, cell: Cell, k: int = 0) -> dict[str, Any]:
        """Launch ``k`` of a cell whose pre-launch verdict was taken: its record as if it
        were the only one (kept in its scratch folder)."""
        cell_dir, env = self._scratch(cell, k)
        outcome = self.launcher.launch(payload=cell_dir / "payload.json", world_size=cell.knobs.world_size,
                                       timeout_s=self.suite.timeout_s, env=env)
        record = self._classify(cell, cell_dir, outcome)
        if record["status"] == "ok":
            with guard.critical():  # a resume reads it: whole or absent
                (cell_dir / LAUNCH_RECORD).write_text(json.dumps(record))
        return record

    def verdict(self, cell: Cell) -> dict[str, Any] | None:
        """The pre-launch verdict: an ``unsupported`` record (adapter, device, or
        predicted memory over the device's), or None when the cell can launch."""
        knobs = cell.knobs
        # A launcher whose ranks run elsewhere (SLURM) cannot judge the device from here.
        here = not getattr(self.launcher, "remote", False)
        reason = (adapters.why_not(knobs)
                  or (here and _device_missing(knobs.device, self.launcher.ranks_on_this_host(knobs.world_size)))
                  or self._fit(knobs))
        return self._record(cell, status="unsupported", reason=reason) if reason else None

    def launch_dir(self, cell: Cell, k: int) -> Path:
        """Scratch folder of launch k: ``.<run_id>/<cell_id>`` for the first, ``<cell_id>.launch<k>`` after."""
        return self.run_file.path.parent / f".{self.run_file.run_id}" / (cell.id if k == 0 else f"{cell.id}.launch{k}")

    def _finished_launches(self, cell: Cell) -> dict[int, dict[str, Any]]:
        found = {}
        for k in range(self.suite.repeat):
            path = self.launch_dir(cell, k) / LAUNCH_RECORD
            try:
                found[k] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return found

    def prepare(self, cell: Cell) -> dict[str, Any] | tuple[Path, dict[str, str]]:
        """The pre-launch verdict (an ``unsupported`` record), or the first launch's
        scratch folder holding ``payload.json`` and the ranks' environment."""
        return self.verdict(cell) or self._scratch(cell, 0)

    def _scratch(self, cell: Cell, k: int) -> tuple[Path, dict[str, str]]:
        """Launch k's scratch folder with ``payload.json``, and the ranks' environment."""
        knobs = cell.knobs
        cell_dir = self.launch_dir(cell, k)
        # Threads per rank: this host's cores over the ranks it runs (a remote launcher sets its own).
        ranks_here = self.launcher.ranks_on_this_host(knobs.world_size)
        threads = max(1, (os.cpu_count() or 1) // (ranks_here or knobs.world_size))
        payload = {"knobs": knobs.resolved(), "steps": self.suite.steps, "warmup": self.suite.warmup, "seed": self.suite.seed}
        if self.suite.profiles(knobs) and k == 0:  # traces next to the results: <run_id>.profiles/<cell_id>/rank<R>.trace.json.gz
            trace_dir = f"{self.run_file.run_id}.profiles/{cell.id}"
            payload["profile_dir"] = str((self.run_file.path.parent / trace_dir).resolve())
            payload["profile_trace_dir"] = trace_dir
        if knobs.device == "cpu":
            payload["cpu_peak_flops"] = self._cpu_peak(threads)
            payload["cpu_peak_source"] = f"measured: fp32 matmul probe, {threads} thread(s) per rank"
        try:
            shutil.rmtree(cell_dir, ignore_errors=True)
            cell_dir.mkdir(parents=True)
            (cell_dir / "payload.json").write_text(json.dumps(payload))
        except OSError as exc:
            raise ResultsWriteError(exc.errno, f"cannot write the scratch folder {cell_dir}: {exc.strerror or exc}") from exc
        env = {**({"OMP_NUM_THREADS": str(threads)} if ranks_here else {}), "PYTHONUNBUFFERED": "1", "TORCHELASTIC_ERROR_FILE": str(cell_dir / "torchelastic.json")}
        return cell_dir, env

    def _fit(self, knobs) -> str | None:
        from bench.plan.fit import available_bytes, fit_reason

        return fit_reason(knobs, available_bytes(self.suite, knobs.device))

    def _cpu_peak(self, threads: int) -> float:
        if threads not in self._cpu_peaks:
            from bench.meters.throughput import cpu_matmul_peak_flops

            self._cpu_peaks[threads] = cpu_matmul_peak_flops(threads)
        return self._cpu_peaks[threads]

    def _classify(self, cell: Cell, cell_dir: Path, outcome: LaunchOutcome) -> dict[str, Any]:
        stderr = _tail(outcome.stderr_path)
        timing = {"wall_s": outcome.wall_s, "returncode": outcome.returncode, "launcher": self.launcher.name,
                  "launch_start_unix": outcome.start_unix}
        result_path = cell_dir / "result.json"
        if result_path.exists():
            # Judge success by the record, not the exit code (DeepSpeed can abort after finishing).
            result = json.loads(result_path.read_text())
            timed = sum(result["metrics"]["step_time_s"])
            timing["fixed_cost_s"] = outcome.wall_s - timed
            timing["phases_rank0"] = result.get("phases_rank0")
            reason = None if outcome.returncode == 0 else f"record complete; process exited {outcome.returncode} afterwards"
            return self._record(cell, status="ok", reason=reason, result=result, timing=timing)
        errors = [json.loads(p.read_text()) for p in sorted(cell_dir.glob("error.rank*.json"))]
        if outcome.timed_out:
            return self._record(cell, status="timeout", reason=f"exceeded timeout_s = {self.suite.timeout_s:g}; process group killed",
                                timing=timing, stderr_tail=stderr)
        for wanted in ("oom", "unsupported"):
            hits = [e for e in errors if e["status"] == wanted]
            if hits:
                return self._record(cell, status=wanted, reason=hits[0]["reason"], timing=timing,
                                    stderr_tail=hits[0]["traceback"] or stderr)
        died = _signal_reason(stderr)
        if died:  # a rank killed by a signal is the root cause; peers' errors are symptoms
            status = "oom" if "SIGKILL" in died else "error"
            return self._record(cell, status=status, reason=died, timing=timing, stderr_tail=stderr)
        # Ranks that only lost their peer are symptoms of another rank's failure.
        errors.sort(key=lambda e: "Connection closed by peer" in e["reason"])
        if errors:
            return self._record(cell, status="error", reason=errors[0]["reason"], timing=timing,
                                stderr_tail=errors[0]["traceback"] or stderr)
        status = "oom" if _OOM.search(stderr) else "error"
        last = last_error_line(stderr)
        return self._record(cell, status=status, reason=f"exit code {outcome.returncode} with no record"
                            + (f": {last}" if last else ""), timing=timing, stderr_tail=stderr)

    def _record(self, cell: Cell, *, status: str, reason: str | None, result: dict[str, Any] | None = None,
                timing: dict[str, Any] | None = None, stderr_tail: str | None = None) -> dict[str, Any]:
        knobs = cell.knobs
        theory = predict(knobs, warmup=self.suite.warmup, steps=self.suite.steps)
        metrics = result["metrics"] if result else None
        return {
            "schema_version": SCHEMA_VERSION,
            "suite": self.suite.name,
            "run_id": self.run_file.run_id,
            "cell_id": cell.id,
            "cell_label": cell.label,
            "adapter": knobs.adapter,
            "status": status,
            "reason": reason,
            "config": knobs.resolved(),
            "techniques": used_by(knobs),
            "run": {"steps": self.suite.steps, "warmup": self.suite.warmup, "seed": self.suite.seed, "timeout_s": self.suite.timeout_s,
                    "quality": self.suite.quality.model_dump(), "suite_file": self.suite_file},
            "env": {**self.env, "device_name": result["device_name"] if result else None},
            "notes": {**(result["notes"] if result else {}), **({"plan": cell.plan} if cell.plan else {})},
            "metrics": metrics,
            "theory": theory,
            "theory_ratio": ratios(metrics, theory) if metrics else {},
            "timing": timing or {},
            "stderr_tail": stderr_tail,
        }


def _device_missing(device: str, ranks_here: int | None) -> str | None:
    """No CUDA device, or fewer visible devices than the ranks this host runs
    (each rank takes its own GPU: NCCL refuses two ranks on one device, and
    ``set_device`` beyond the count fails with "invalid device ordinal")."""
    if device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return "device = 'cuda' but no CUDA device is visible on this host"
    visible = torch.cuda.device_count()
    if ranks_here and ranks_here > visible:
        return (f"{ranks_here} ranks on this host but {visible} visible CUDA device(s): each rank needs its own GPU "
                f"(world_size / nodes ≤ the devices of a node)")
    return None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace")


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b|error:|fatal:|RuntimeError)")
_LAUNCHER_NOISE = ("ChildFailedError", "FAILED", "Traceback")


def last_error_line(stderr: str) -> str | None:
    """The last line of the ranks' stderr that states an error (``TypeError: …``,
    ``error: …``), skipping the launcher's own failure summary; None if there is none."""
    for line in reversed(stderr.splitlines()):
        line = line.strip()
        if _ERROR_LINE.match(line) and not any(noise in line for noise in _LAUNCHER_NOISE):
            return line[:300]
    return None


def _signal_reason(stderr: str) -> str | None:
    """A rank killed by a signal, from torchrun's failure summary (which may
    list a peer's symptom as the 'root cause', so every entry is read).
    SIGTERM is what torchrun sends the survivors, so it is never the cause."""
    killed = [
        (rank, sig)
        for rank, sig in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*-\d+[^\n]*\((SIG\w+)\)", stderr)
        if sig != "SIGTERM"
    ]
    if not killed:
        return None
    rank, sig = killed[0]
    why = " (likely the kernel's OOM killer)" if sig == "SIGKILL" else ""
    return f"rank {rank} killed by {sig}{why}"
