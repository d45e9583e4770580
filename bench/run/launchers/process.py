"""Starting torchrun agents as process groups and killing them whole.

Each agent runs in a new session, so a timeout can kill the agent and every
rank as one process group; ranks also die with their agent (PR_SET_PDEATHSIG,
set in the worker)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from bench import REPO
from bench.run.launchers.base import LaunchOutcome


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: this process gets SIGKILL when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except OSError:
        pass


def kill_session(leader: int) -> None:
    """SIGTERM, then SIGKILL, the session ``leader`` started: the leader (a torchrun
    agent or the warm launcher's launch leader), its ranks and anything they forked."""
    try:
        head = psutil.Process(leader)
        family = [head, *head.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        # A short grace for SIGTERM: a hung cell must be reported within timeout + 5 s.
        _, alive = psutil.wait_procs(family, timeout=2 if sig == signal.SIGTERM else 5)
        if not alive:
            break


def kill_tree(proc: subprocess.Popen) -> None:
    """``kill_session`` for an agent this process started, then reap it."""
    kill_session(proc.pid)
    proc.wait()


LOOPBACK = "127.0.0.1"


def loopback_interface() -> str:
    """Name of the interface holding 127.0.0.1 (``lo`` on Linux)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addrs):
            return name
    return "lo"


def run_agents(commands: list[list[str]], cell_dir: Path, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
    """Start every torchrun agent (each in its own session), wait for all of
    them, kill every one past ``timeout_s``. The first agent logs to
    stdout.log/stderr.log, agent k > 0 to stdout.node<k>.log/stderr.node<k>.log;
    the outcome's return code is the first non-zero one."""
    start, start_unix = time.perf_counter(), time.time()
    logs = [(cell_dir / f"stdout{'' if k == 0 else f'.node{k}'}.log", cell_dir / f"stderr{'' if k == 0 else f'.node{k}'}.log")
            for k in range(len(commands))]
    procs: list[subprocess.Popen] = []
    timed_out = False
    try:
        for cmd, (out, err) in zip(commands, logs):
            with open(out, "wb") as fo, open(err, "wb") as fe:
                procs.append(subprocess.Popen(
                    cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env={**os.environ, **env},
                    start_new_session=True, preexec_fn=die_with_parent, cwd=REPO,
                ))
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    except BaseException:
        for proc in procs:
            kill_tree(proc)  # Ctrl-C: leave nothing behind
        raise
    if timed_out:
        for proc in procs:
            kill_tree(proc)
    codes = [p.returncode for p in procs]
    code = next((c for c in codes if c != 0), codes[0])
    return LaunchOutcome(code, timed_out, time.perf_counter() - start, start_unix, *logs[0])
