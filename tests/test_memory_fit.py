"""Pre-launch memory fit (bench.plan.fit): with `device_memory_gib` set, a cell whose
predicted bytes exceed it is recorded `unsupported` without launching, and
`bench validate` shows the prediction; a cell that fits runs, and its measured
peak is at least the prediction (which is a lower bound)."""
from __future__ import annotations

import pytest

from bench.plan.fit import GIB, fit_reason, predict_device_bytes
from bench.config.knobs import Knobs
from bench.theory import model_state_bytes
from impl.model_config import PRESETS, total_params
from tests.conftest import bench, records

SUITE = """
name: fit
steps: 2
warmup: 1
timeout_s: 180
device_memory_gib: 0.05
defaults: {world_size: 1, batch_size: 8, seq_len: 64}
matrix:
  model: [tiny, small]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "fit.yaml").write_text(SUITE)
    validate = bench("validate", str(tmp / "fit.yaml")).stdout
    bench("run", str(tmp / "fit.yaml"), "--results", str(tmp / "results"), "--no-progress")
    recs = {r["config"]["model"]: r for r in records(tmp / "results", "fit")}
    return tmp, validate, recs


def test_cell_over_the_device_is_unsupported_and_not_launched(run) -> None:
    tmp, _, recs = run
    small = recs["small"]
    pred = predict_device_bytes(Knobs(model="small"))
    assert small["status"] == "unsupported"
    assert small["reason"].startswith(f"predicted {pred.total_bytes / GIB:.2f} GiB > 0.05 GiB available per device")
    assert small["metrics"] is None and small["timing"] == {}
    assert not list((tmp / "results" / "fit").glob(f".*/{small['cell_id']}"))  # no scratch folder: never launched


def test_cell_that_fits_runs_and_its_peak_is_at_least_the_prediction(run) -> None:
    _, _, recs = run
    tiny = recs["tiny"]
    assert tiny["status"] == "ok", tiny["reason"]
    pred = predict_device_bytes(Knobs(model="tiny"))
    measured = tiny["metrics"]["peak_mem_bytes"]
    assert pred.total_bytes <= measured, (pred, measured)
    print(f"tiny: predicted lower bound {pred.total_bytes / 2**20:.2f} MiB, measured peak {measured / 2**20:.2f} MiB "
          f"(ratio {measured / pred.total_bytes:.2f})")


def test_validate_prints_the_prediction(run) -> None:
    _, out, recs = run
    flat = " ".join(out.split())
    assert "unsupported: predicted" in flat and "DOES NOT FIT" in flat and "— fits" in flat
    assert flat.count("of 51.2 MiB per device") == 2


def test_prediction_is_model_state_plus_activations() -> None:
    k = Knobs(model="small", zero=3, world_size=4, offload="optimizer+params")
    pred = predict_device_bytes(k)
    psi = total_params(PRESETS["small"])
    state = model_state_bytes(psi, zero=3, dp=4, precision="fp32", offload=True)
    assert pred.state_bytes == pytest.approx(state["grads"])  # params and optimizer live on the host
    cfg = PRESETS["small"]
    # Korthikanti 34·s·b·h per layer in 16-bit (fp32: ×2), micro-batch 8/4
    assert pred.activation_bytes == pytest.approx(cfg.n_layers * 34 * 64 * 2 * cfg.dim * 2)
    assert fit_reason(k, available=None) is None
    assert fit_reason(k, available=pred.total_bytes) is None
    assert "predicted" in fit_reason(k, available=pred.total_bytes - 1)


def test_the_logits_transient_is_a_named_term_of_the_prediction() -> None:
    """fp32 logits of one micro-batch and their gradient, 2·b·s·V·4 bytes (V/tp vocab-parallel)."""
    cfg = PRESETS["tiny"]
    for kw, b, tp in (({}, 8, 1), ({"world_size": 4, "microbatches": 2}, 1, 1), ({"world_size": 2, "tp": 2}, 8, 2)):
        pred = predict_device_bytes(Knobs(model="tiny", **kw))
        assert pred.logits_bytes == 2 * b * 64 * cfg.vocab_size / tp * 4, kw
        assert pred.total_bytes == pytest.approx(pred.state_bytes + pred.activation_bytes + pred.logits_bytes)
