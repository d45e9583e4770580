"""Ranks end without a deadlock. Freeing a gloo process group holds the GIL and
waits for gloo's worker thread, which may still be freeing the last
collective's tensors and needs the GIL (py-spy: ~ProcessGroupGloo in
pthread_mutex_lock; runLoop in ~AsyncAllgatherWork waiting for the GIL).
Before the worker kept what it built until os._exit, 7 of 13 runs of this
40-launch cell here had a launch hang at exit (rank 0 before its record, or a
rank killed at the timeout after rank 0 wrote it): this test catches the old
code about half the time, and CI's A/A test failed on it once. With the fix: 240 of 240 launches of this
cell and the in-house one ended (bench/run/worker.py, ``_KEPT_UNTIL_EXIT``)."""
from __future__ import annotations

import json

from tests.conftest import bench

SUITE = """
name: exit
steps: 15
warmup: 2
timeout_s: 60
repeat: 40
defaults: {model: tiny, world_size: 2, batch_size: 8, seq_len: 32, adapter: torch}
"""


def test_forty_ddp_launches_all_end(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    bench("run", str(tmp_path / "s.yaml"), "--results", str(tmp_path / "r"), "--run-id", "x", "--no-progress")
    (record,) = [json.loads(line) for line in (tmp_path / "r" / "exit" / "x.jsonl").read_text().splitlines()]
    assert len(record["metrics"]["launches"]) == 40
    # A rank hung after rank 0 wrote the record still gives an ok launch, killed at the timeout: its reason says so.
    assert record["status"] == "ok" and record["reason"] is None, record["reason"]
    assert [t["returncode"] for t in record["timing"]["launches"]] == [0] * 40
