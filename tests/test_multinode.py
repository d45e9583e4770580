"""Multi-node torchrun, simulated: two agents on loopback with --nnodes 2 (one
rank each) meet at one c10d rendezvous endpoint and train a real in-house DDP
cell through `bench run`; the record must match the single-node 2-rank run."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.run.launchers.choose import make_launcher
from bench.run.launchers.torchrun import MultiNodeTorchrun
from bench.config.suite import SuiteError, parse_suite
from tests.conftest import bench, records

CELL = "defaults: {model: tiny, world_size: 2, batch_size: 4, seq_len: 16}\n"
RUN = "steps: 3\nwarmup: 1\ntimeout_s: 180\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    texts = {
        "single": f"name: single\n{RUN}{CELL}",
        "multi": f"name: multi\n{RUN}nodes: 2\nnproc_per_node: 1\nrdzv_endpoint: 127.0.0.1:{port}\n{CELL}",
    }
    out = {}
    for name, text in texts.items():
        (tmp / f"{name}.yaml").write_text(text)
        extra = ["--simulate-nodes"] if name == "multi" else []
        bench("run", str(tmp / f"{name}.yaml"), "--results", str(tmp / "results"), "--no-progress", *extra)
        (rec,) = records(tmp / "results", name)
        out[name] = rec
    out["scratch"] = next((tmp / "results" / "multi").glob(".*/*/"))
    return out


def test_two_node_cell_is_ok_and_matches_single_node(runs) -> None:
    single, multi = runs["single"], runs["multi"]
    assert multi["status"] == "ok", multi["reason"] or multi["stderr_tail"]
    assert single["status"] == "ok"
    assert multi["cell_id"] == single["cell_id"]  # node layout is a run setting, not a knob
    assert multi["config"]["world_size"] == 2 and multi["config"]["dp"] == 2
    ls, lm = single["metrics"]["losses"], multi["metrics"]["losses"]
    assert len(lm) == len(ls) == 4
    assert max(abs(a - b) for a, b in zip(ls, lm)) <= 1e-6, (ls, lm)
    assert len(multi["metrics"]["comm_bytes_per_step_by_rank"]) == 2
    assert multi["metrics"]["comm_bytes_per_step"] == single["metrics"]["comm_bytes_per_step"]


def test_each_node_ran_its_own_agent(runs) -> None:
    scratch: Path = runs["scratch"]
    # one agent per node, each with its own log; one rank per agent
    assert (scratch / "stderr.log").exists() and (scratch / "stderr.node1.log").exists()
    assert {p.name for p in scratch.glob("rank*.pid")} == {"rank0.pid", "rank1.pid"}


def test_node_commands_share_one_rendezvous(tmp_path) -> None:
    suite, _ = parse_suite(f"name: x\nnodes: 2\nnproc_per_node: 4\nrdzv_endpoint: head:29500\n"
                           "defaults: {world_size: 8}\n")
    payload = tmp_path / ".run1" / "abc" / "payload.json"
    cluster = [make_launcher(suite, node_rank=r) for r in (0, 1)]
    assert all(isinstance(x, MultiNodeTorchrun) and not x.simulated for x in cluster)
    cmds = [x.command(payload, x.node_ranks[0]) for x in cluster]
    assert cmds[0] == cmds[1]  # on a cluster every node runs the same command line
    args = dict(a.split("=", 1) for a in cmds[0] if a.startswith("--") and "=" in a)
    assert args == {"--nnodes": "2", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "head:29500", "--rdzv-id": "run1-abc"}
    assert cmds[0][-3:] == ["-m", "bench.run.worker", str(payload)]
    sim = make_launcher(suite, simulate_nodes=True)
    assert sim.node_ranks == (0, 1)
    hosts = [[a for a in sim.command(payload, r) if a.startswith("--rdzv-conf")] for r in (0, 1)]
    assert hosts == [["--rdzv-conf=is_host=1"], ["--rdzv-conf=is_host=0"]]
    with pytest.raises(ValueError, match="node_rank"):
        make_launcher(suite, node_rank=2)


@pytest.mark.parametrize("text,fragment", [
    ("nodes: 2\nnproc_per_node: 4\nrdzv_endpoint: h:1\ndefaults: {world_size: 4}\n",
     "matrix cell 0: world_size = 4 but nodes × nproc_per_node = 2 × 4 = 8"),
    ("nodes: 2\nrdzv_endpoint: h:1\ndefaults: {world_size: 4}\n", "nproc_per_node: required when nodes = 2"),
    ("nodes: 2\nnproc_per_node: 2\ndefaults: {world_size: 4}\n", "rdzv_endpoint: required when nodes = 2"),
    ("nproc_per_node: 2\ndefaults: {world_size: 4}\n", "world_size = 4 exceeds nproc_per_node = 2"),
    ("nodes: 0\n", "nodes = 0"),
    ("rdzv_endpoint: 'head'\n", "rdzv_endpoint = 'head'"),
])
def test_node_settings_are_validated(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError) as info:
        parse_suite("name: x\n" + text)
    assert fragment in str(info.value), str(info.value)
