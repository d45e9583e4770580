"""A cell that ends with no record says why (#23): its reason carries the last
line of the ranks' stderr that states an error, not only the exit code."""
from __future__ import annotations

from bench.run.runner import last_error_line

# The stderr of a real failure (a rank that could not write its record), launcher summary included.
STDERR = """USDT:2026-12-06 19:25:57 17111:17111 SyncActivityProfilerHandler.cpp:59] profiler_stop
Traceback (most recent call last):
  File "/work/main/bench/run/launchers/forkserver.py", line 169, in _rank
    code = main([payload])
  File "/work/main/bench/run/worker.py", line 65, in main
    _write_json(cell_dir / "result.json", record)
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/json/encoder.py", line 180, in default
    raise TypeError(f'Object of type {o.__class__.__name__} '
TypeError: Object of type int64 is not JSON serializable
============================================================
bench.run.launchers.forkserver FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 17110)
============================================================
"""


def test_the_last_error_line_is_the_rank_error_not_the_launcher_summary():
    assert last_error_line(STDERR) == "TypeError: Object of type int64 is not JSON serializable"


def test_a_payload_the_rank_cannot_find():
    err = "FileNotFoundError: [Errno 2] No such file or directory: 'results/one/.run/abc/payload.json'\n"
    assert last_error_line("noise\n" + err + "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n") \
        == err.strip()


def test_no_error_line_gives_none():
    assert last_error_line("USDT profiler_start\nsome output\n") is None
