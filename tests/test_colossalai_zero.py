"""Colossal-AI's ZeRO (#23): a zero 1/2 cell builds LowLevelZeroPlugin with its
stage, precision and offload, a zero 3 cell GeminiPlugin — never plain DDP under
a ZeRO label. The plugins are built here on a one-rank gloo group (they need
one; their optimizers then assert CUDA, so training runs only on a GPU: the
`gpu` test below, run by scripts/gpu_check.sh)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import adapters
from bench.config.knobs import Knobs
from tests.conftest import ROOT, run_suite

PROBE = """
import json, sys, tempfile
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from bench.adapters.colossalai.zero import plugin_for
from bench.config.knobs import Knobs
out = []
for kw in json.loads(sys.argv[1]):
    p = plugin_for(Knobs(adapter="colossalai", world_size=2, device="cuda", **kw))
    z, g = getattr(p, "zero_optim_kwargs", {}), getattr(p, "gemini_config", {})
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin
    kind = "LowLevelZeroPlugin" if isinstance(p, LowLevelZeroPlugin) else "GeminiPlugin" if isinstance(p, GeminiPlugin) else None
    out.append({"class": kind, "stage": getattr(p, "stage", None), "precision": getattr(p, "precision", None),
                "partition_grad": z.get("partition_grad"), "cpu_offload": z.get("cpu_offload"),
                "mixed_precision": str(g.get("mixed_precision")), "offload_optim_frac": g.get("offload_optim_frac"),
                "offload_param_frac": g.get("offload_param_frac"),
                "grad_accumulation": g.get("enable_gradient_accumulation")})
print("PLUGINS " + json.dumps(out))
"""
CELLS = [{"zero": 1}, {"zero": 2, "precision": "bf16", "offload": "optimizer"},
         {"zero": 3, "precision": "bf16", "offload": "optimizer+params", "microbatches": 2}, {"zero": 3, "precision": "fp16"}]


def test_the_plugin_is_the_one_the_cell_names():
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(CELLS)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PLUGINS "))
    z1, z2, z3, z3h = json.loads(line.removeprefix("PLUGINS "))
    assert (z1["class"], z1["stage"], z1["precision"], z1["partition_grad"], z1["cpu_offload"]) == (
        "LowLevelZeroPlugin", 1, "fp32", False, False)
    assert (z2["class"], z2["stage"], z2["precision"], z2["partition_grad"], z2["cpu_offload"]) == (
        "LowLevelZeroPlugin", 2, "bf16", True, True)
    assert (z3["class"], z3["mixed_precision"], z3["offload_optim_frac"], z3["offload_param_frac"],
            z3["grad_accumulation"]) == ("GeminiPlugin", "torch.bfloat16", 1.0, 1.0, True)
    assert (z3h["mixed_precision"], z3h["offload_optim_frac"], z3h["offload_param_frac"]) == ("torch.float16", 0.0, 0.0)


@pytest.mark.parametrize("kw, why", [
    ({"zero": 3}, "GeminiPlugin supports fp16/bf16 only"),
    ({"zero": 0, "precision": "bf16"}, "precision_bf16 with zero 0"),
    ({"zero": 3, "precision": "bf16", "optimizer": "sgd"}, "HybridAdam"),
])
def test_what_the_mapping_cannot_run_is_refused_on_cuda_with_the_reason(kw, why):
    assert why in adapters.why_not(Knobs(adapter="colossalai", world_size=2, device="cuda", **kw))


def test_zero_cells_run_on_cuda_and_stay_unsupported_on_cpu():
    for kw in CELLS:
        assert adapters.why_not(Knobs(adapter="colossalai", world_size=2, device="cuda", **kw)) is None, kw
        assert "not on cpu" in adapters.why_not(Knobs(adapter="colossalai", world_size=2, device="cpu", **kw))


@pytest.mark.gpu
def test_zero_cells_train_on_cuda(tmp_path_factory):
    recs = run_suite(tmp_path_factory, """
name: colossal-zero-gpu
steps: 3
warmup: 2
timeout_s: 300
defaults: {adapter: colossalai, model: tiny, device: cuda, world_size: 1, batch_size: 8, seq_len: 64}
include:
  - {zero: 1}
  - {zero: 2, precision: bf16}
  - {zero: 3, precision: bf16}
""")
    for r in recs:
        assert r["status"] == "ok", (r["config"], r["reason"])
        want = "GeminiPlugin" if r["config"]["zero"] == 3 else "LowLevelZeroPlugin"
        assert r["notes"]["booster_plugin_class"].startswith(want)
