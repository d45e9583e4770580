"""The `warm` local launcher: single-node cells started from a pre-imported parent.

A cell's fixed cost under torchrun is mostly start-up: the agent (~1.9 s),
every rank importing torch and the harness (1.5–2.3 s), the first optimizer
importing ``torch._dynamo`` (1.2–1.6 s). ``WarmLocal`` starts one fork server
per run (``bench.run.launchers.forkserver``) that pays those imports once,
then forks a fresh set of rank processes for every launch — the same worker,
the same environment torchrun gives it, the same isolation (no state carried
from launch to launch), and one process group per launch, which a timeout
kills whole. torchrun remains the launcher for multi-node and SLURM cells and
is selectable locally (``--launcher torchrun``).
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import REPO
from bench.run.launchers.base import LaunchOutcome
from bench.run.launchers.process import die_with_parent, kill_session
from bench.run.launchers.torchrun import LocalTorchrun

READY_TIMEOUT_S = 120.0


class WarmLocal:
    name = "warm"

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None
        self.warm_s: float | None = None
        """Seconds the fork server took to import everything (once per run)."""

    def ranks_on_this_host(self, world_size: int) -> int:
        return world_size

    def launch(self, *, payload: Path, world_size: int, timeout_s: float, env: dict[str, str]) -> LaunchOutcome:
        server = self._ready()
        payload = payload.resolve()  # the ranks start in the source tree, not the user's directory
        out, err = payload.parent / "stdout.log", payload.parent / "stderr.log"
        request = {"payload": str(payload), "world_size": world_size, "stdout": str(out), "stderr": str(err),
                   "env": {**os.environ, **LocalTorchrun.network_env(), **env}}
        start, start_unix = time.perf_counter(), time.time()
        leader = None
        try:
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            leader = self._read(30.0)["leader"]
            reply = self._read(max(0.0, timeout_s - (time.perf_counter() - start)))
            timed_out = reply is None
            if timed_out:
                kill_session(leader)
                reply = self._read(30.0)
        except BaseException:
            if leader is not None:
                kill_session(leader)  # Ctrl-C or a broken server: leave nothing behind
            self.close()
            raise
        code = reply.get("returncode") if reply else None
        return LaunchOutcome(code, timed_out, time.perf_counter() - start, start_unix, out, err)

    def _ready(self) -> subprocess.Popen:
        if self._server is not None and self._server.poll() is None:
            return self._server
        self._server = subprocess.Popen(
            [sys.executable, "-u", "-m", "bench.run.launchers.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        hello = self._read(READY_TIMEOUT_S)
        if not hello or not hello.get("ready"):
            self.close()
            raise RuntimeError(f"the warm launcher's fork server did not start: {hello}")
        self.warm_s = hello["warm_s"]
        return self._server

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """The server's next reply, or None after ``timeout_s``; a dead server raises."""
        assert self._server is not None and self._server.stdout is not None
        ready, _, _ = select.select([self._server.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm launcher's fork server exited ({self._server.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self._server is None:
            return
        try:
            self._server.stdin.close()
            self._server.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._server.kill()
            self._server.wait()
        self._server = None

