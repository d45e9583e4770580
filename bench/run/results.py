"""Append-only, versioned result records: ``results/<suite>/<run_id>.jsonl``.

One JSON object per line, written with ``write`` + ``fsync`` under an
exclusive lock, so a killed runner leaves at most one torn last line, which
readers detect and skip; a write that fails (full disk, quota) is cut back
off, so the file keeps only whole records. A run is driven by one runner at
a time (``RunFile.lock``). Statistics are recomputed from the raw
samples at report time. No torch import here: reports read only these files.
"""
from __future__ import annotations

import errno
import fcntl
import getpass
import json
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from bench import REPO

SCHEMA_VERSION = 2
"""2: the context-parallel degree `cp` (ring self-attention over cp ranks; v1 spelled it `tp`)."""
STATUSES = ("ok", "unsupported", "error", "oom", "timeout")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_SUITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ResultsWriteError(OSError):
    """The results folder refused a write (full disk, quota, permissions):
    the records already written are intact and the run can be resumed."""


class RunInUse(RuntimeError):
    """Another runner holds this run."""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-' (no path separators)")
    return run_id


def check_suite_name(name: str) -> str:
    if not isinstance(name, str) or not _SUITE_NAME.match(name):
        raise ValueError(f"suite name {name!r} must be letters, digits, '.', '_' or '-' (no path separators or markup)")
    return name


def confined(root: Path, *parts: str) -> Path:
    """``root/parts...``, refusing anything that would resolve outside ``root``."""
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"{path} lies outside {root}")
    return path


@dataclass(frozen=True, slots=True)
class RunFile:
    """One run's record file, confined under the results root."""

    root: Path
    suite: str
    run_id: str

    @property
    def path(self) -> Path:
        return confined(self.root, check_suite_name(self.suite), f"{check_run_id(self.run_id)}.jsonl")

    def append(self, record: dict[str, Any]) -> None:
        from bench.run.stop import guard

        with guard.critical():  # a stop signal waits for the whole line
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(finite(record), allow_nan=False, default=_jsonable) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ResultsWriteError(exc.errno, f"cannot write {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            try:
                _heal_torn_tail(fd, size)
                _write_all(fd, line)
                os.fsync(fd)
            except OSError as exc:
                # Cut the partial record off: the file keeps only whole lines.
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise ResultsWriteError(exc.errno or errno.EIO, f"cannot write {self.path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for one runner: a second ``bench run`` of the same run id
        (a double ``--resume``) would repeat cells and clear the first one's
        scratch folders. The lock dies with its process, even under SIGKILL."""
        lock_path = self.path.parent / f".{self.run_id}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ResultsWriteError(exc.errno, f"cannot write {lock_path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunInUse(f"run {self.run_id} of suite {self.suite} is being written by another bench run "
                               f"(pid {holder}); wait for it, or start a new run") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(self.path)) if self.path.exists() else []


def finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: each non-finite float becomes null and its path is
    listed under ``nonfinite`` (a diverged loss is a result, not a crash)."""
    paths: list[str] = []

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            paths.append(f"{path}={v}")
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v

    out = walk(record, "")
    if paths:
        out["nonfinite"] = paths
    return out


def _heal_torn_tail(fd: int, size: int) -> None:
    """A runner killed mid-write leaves a line without its newline; end it so
    the next record starts on a line of its own (readers skip the torn one)."""
    if size and os.pread(fd, 1, size - 1) != b"\n":
        _write_all(fd, b"\n")


def _write_all(fd: int, data: bytes) -> None:
    """``write`` may take only part of the bytes (a file-size limit, a signal)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_records(path: str | Path, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of one JSONL file, each checked (``record_check``: the fields the analysis
    reads, typed; non-finite floats as null) and migrated to the current schema. A torn
    or foreign line, a record that fails the check or one of a newer schema is skipped
    with a warning naming the line and the field, and appended to ``skipped``."""
    from bench.run.record_check import normalised

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            why, rec = None, None
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                why = "a torn or malformed line"
            if why is None and (not isinstance(rec, dict) or "cell_id" not in rec):
                why = "not a TrainBench record (no cell_id)"
            if why is None and isinstance(rec.get("schema_version"), int) and rec["schema_version"] > SCHEMA_VERSION:
                why = (f"schema_version {rec['schema_version']} is newer than this TrainBench's ({SCHEMA_VERSION}); "
                       "upgrade TrainBench to read it")
            if why is None:
                rec, why = normalised(rec)
            if why is not None:
                print(f"warning: {path}:{n}: skipping the line: {why[:300]}", file=sys.stderr)
                if skipped is not None:
                    skipped.append(f"line {n}: {why[:300]}")
                continue
            yield migrate(rec)


def migrate(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the current schema spells it (records on disk are never rewritten)."""
    version = record.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise ValueError(f"record schema {version} is newer than this TrainBench ({SCHEMA_VERSION})")
    if version < 2:
        record = _v1_ring_as_cp(record)
    return record


def _v1_ring_as_cp(record: dict[str, Any]) -> dict[str, Any]:
    """v1 ran ring self-attention as `tp: r, sequence_parallel: ring` (tp = the
    ring's size, weights replicated): that is `cp: r, tp: 1` now, the same cell.
    Its `cell_id` stays the v1 one; `bench compare` matches cells by config."""
    config = record.get("config")
    if not isinstance(config, dict) or config.get("sequence_parallel") != "ring" or "cp" in config:
        return record
    tp = config.get("tp", 1)
    return {**record, "schema_version": 2, "config": {**config, "cp": tp, "tp": 1}}


def resolve_results(target: str | Path) -> list[Path]:
    """A .jsonl file, or a suite folder (its newest run), or a results root (newest run of each suite)."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise FileNotFoundError(f"no results at {target}")
    runs = sorted(target.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    if runs:
        return [runs[-1]]
    found = []
    for sub in sorted(p for p in target.iterdir() if p.is_dir()):
        inner = sorted(sub.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
        if inner:
            found.append(inner[-1])
    if not found:
        raise FileNotFoundError(f"no result files under {target}")
    return found


def environment(repo: Path | None = None) -> dict[str, Any]:
    """Machine and library facts stored beside every record."""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "colossalai", "megatron-core", "transformers", "bitsandbytes"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    sha, dirty = _git(repo or REPO)
    return {
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "git_sha": sha,
        "git_dirty": dirty,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(repo: Path) -> tuple[str | None, bool | None]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None, None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row per record for CSV export (lists are kept as JSON text)."""
    row: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            row[prefix] = json.dumps(value)
        else:
            row[prefix] = value

    walk("", record)
    return row
