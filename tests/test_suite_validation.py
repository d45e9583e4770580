"""Malformed suites are rejected at the door, naming the field; nothing launches."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bench.config.suite import SuiteError, parse_suite
from tests.conftest import ROOT, bench

GOOD = """
name: ok
defaults: {world_size: 2, model: tiny}
matrix:
  adapter: [inhouse, torch]
  microbatches: [1, 2]
"""

# (suite text, a fragment the error must contain)
MALFORMED = [
    ("name: x\ndefaults: {world_size: 4, tp: 3, dp: 2}\n", "matrix cell 0: dp*tp*pp = 6 but world_size = 4"),
    ("name: x\ndefaults: {world_size: 2}\nmatrix: {tp: [3]}\n", "world_size = 2 is not divisible by tp*pp = 3"),
    ("name: x\ndefaults: {wrld_size: 2}\n", "defaults: unknown knob 'wrld_size'; did you mean 'world_size'?"),
    ("name: x\nmatrx: {adapter: [torch]}\n", "unknown suite field 'matrx'; did you mean 'matrix'?"),
    ("name: x\ndefaults: {world_size: two}\n", "world_size = 'two'"),
    ("name: x\ndefaults: {world_size: 0}\n", "world_size = 0: Input should be greater than or equal to 1"),
    ("name: x\ndefaults: {batch_size: -8}\n", "batch_size = -8"),
    ("name: x\ndefaults: {adapter: nemo}\n", "adapter = 'nemo'"),
    ("name: x\ndefaults: {model: gpt5}\n", "unknown model preset 'gpt5'"),
    ("name: x\ndefaults: {world_size: 4, tp: 2, tp_mode: 2d}\n", "tp_mode = '2d' needs tp to be a square"),
    ("name: x\ndefaults: {world_size: 2, batch_size: 3}\n", "batch_size = 3 is not divisible by dp*microbatches = 2"),
    ("name: x\nmatrix: {zero: []}\n", "matrix.zero: the list of values is empty"),
    ("name: x\nsteps: 0\n", "steps = 0"),
    ("name: x\ntimeout_s: -1\n", "timeout_s = -1"),
    ("name: ../../etc\n", "name = '../../etc'"),
    ("name: x\ndefaults: {world_size: 1.5}\n", "world_size = 1.5"),
    ("name: x\ndefaults: {world_size: true}\n", "world_size = True"),
    ("name: x\ndefaults: {offload: optimizer}\n", "offload = 'optimizer' needs zero >= 1"),
    ("name: x\ndefaults: [1, 2]\n", "defaults"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("name: x\ndefaults: {world_size: 2\n", "malformed YAML"),
    ("name: x\na: &a [1, 2]\nb: *a\n", "aliases"),
    ("name: !!python/object/apply:os.system ['true']\n", "malformed YAML"),
    ("name: x\ninclude:\n  - {adapter: torch, zero: 5}\n", "include[0]: zero = 5"),
    ("name: x\nexclude:\n  - {adaptr: torch}\n", "exclude[0]: unknown knob 'adaptr'"),
    ("name: x\ndefaults: {sequence_parallel: megatron}\n", "sequence_parallel = 'megatron' needs tp >= 2"),
]


@pytest.mark.parametrize("text,fragment", MALFORMED, ids=[f"bad{i}" for i in range(len(MALFORMED))])
def test_malformed_suite_names_the_field(text: str, fragment: str) -> None:
    with pytest.raises(SuiteError) as info:
        parse_suite(text)
    assert fragment in str(info.value), str(info.value)


def test_every_problem_is_listed_at_once() -> None:
    text = "name: x\nmatrix:\n  world_size: [4]\n  tp: [3, 2]\n  batch_size: [3]\n"
    with pytest.raises(SuiteError) as info:
        parse_suite(text)
    problems = info.value.problems
    assert any(p.startswith("matrix cell 0:") and "tp*pp = 3" in p for p in problems)
    assert any(p.startswith("matrix cell 1:") and "batch_size = 3" in p for p in problems)


def test_cli_rejects_before_launch(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndefaults: {world_size: 2}\nmatrix: {adapter: [inhouse]}\ninclude:\n  - {world_size: 4, tp: 3}\n")
    proc = bench("run", str(bad), "--results", str(tmp_path / "results"), "--no-progress", check=False)
    assert proc.returncode == 2
    assert "include[0]" in proc.stderr and "tp*pp = 3" in proc.stderr
    # The valid cell was not launched either: no results, no scratch folders.
    assert not list((tmp_path / "results").rglob("*"))


def test_matrix_cap_needs_force() -> None:
    text = "name: big\nmatrix:\n  seq_len: [" + ", ".join(str(i) for i in range(1, 41)) + "]\n  batch_size: [" + ", ".join(str(i) for i in range(1, 31)) + "]\n"
    with pytest.raises(SuiteError, match="exceed the cap of 1000"):
        parse_suite(text)
    _, cells = parse_suite(text, max_cells=10**6)
    assert len(cells) == 1200


def test_expansion_order_exclude_include_and_dedup() -> None:
    text = GOOD + "exclude:\n  - {adapter: torch, microbatches: 2}\ninclude:\n  - {adapter: inhouse, microbatches: 2}\n  - {adapter: inhouse, world_size: 1}\n"
    _, cells = parse_suite(text)
    got = [(c.knobs.adapter, c.knobs.microbatches, c.knobs.world_size) for c in cells]
    # the first include duplicates matrix cell 1 and is dropped
    assert got == [("inhouse", 1, 2), ("inhouse", 2, 2), ("torch", 1, 2), ("inhouse", 1, 1)]
    assert [c.label for c in cells] == ["matrix cell 0", "matrix cell 1", "matrix cell 2", "include[1]"]
    assert cells[0].knobs.dp == 2 and cells[3].knobs.dp == 1


def test_ids_are_stable_across_processes() -> None:
    _, cells = parse_suite(GOOD)
    again = [c.id for c in parse_suite(GOOD)[1]]
    assert [c.id for c in cells] == again
    assert len(set(again)) == len(again) == 4
    code = "from bench.config.suite import parse_suite; import sys; print(' '.join(c.id for c in parse_suite(sys.stdin.read())[1]))"
    out = subprocess.run([sys.executable, "-c", code], input=GOOD, capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == again
    # Spelling a default explicitly does not change the id (ids hash resolved knobs).
    explicit = GOOD.replace("{world_size: 2, model: tiny}", "{world_size: 2, model: tiny, dp: 2, precision: fp32}")
    assert [c.id for c in parse_suite(explicit)[1]] == again


def test_interleaved_defaults_to_two_virtual_stages() -> None:
    """torch pipelining's and Megatron's users expect interleaving without spelling v;
    an explicit virtual_stages: 1 is still refused, naming the field."""
    _, cells = parse_suite("name: x\ndefaults: {world_size: 2, pp: 2, microbatches: 4, pp_schedule: interleaved}\n")
    assert cells[0].knobs.virtual_stages == 2
    explicit = parse_suite("name: x\ndefaults: {world_size: 2, pp: 2, microbatches: 4, pp_schedule: interleaved, "
                           "virtual_stages: 2}\n")[1]
    assert explicit[0].id == cells[0].id
    with pytest.raises(SuiteError, match="virtual_stages >= 2"):
        parse_suite("name: x\ndefaults: {world_size: 2, pp: 2, pp_schedule: interleaved, virtual_stages: 1}\n")


def test_cp_is_its_own_degree() -> None:
    """dp = world_size ÷ (cp·tp·pp); a cell that does not divide names every degree."""
    _, cells = parse_suite("name: x\ndefaults: {world_size: 8, cp: 2, tp: 2, sequence_parallel: ring}\n")
    k = cells[0].knobs
    assert (k.dp, k.cp, k.tp, k.dims.world_size) == (2, 2, 2, 8)
    # tp fastest, then cp: ranks 0,1 share a cp coordinate; ranks 0,2 share a tp coordinate
    assert [k.dims.cp_rank(r) for r in range(4)] == [0, 0, 1, 1] and k.dims.coords(2)[2] == 0
    with pytest.raises(SuiteError, match=r"world_size = 6 is not divisible by cp\*tp\*pp = 4 \(cp=2, tp=2, pp=1\)"):
        parse_suite("name: x\ndefaults: {world_size: 6, cp: 2, tp: 2, sequence_parallel: ring}\n")


def test_sequence_parallel_true_means_megatron() -> None:
    _, cells = parse_suite("name: x\ndefaults: {world_size: 2, tp: 2, sequence_parallel: true}\n")
    assert cells[0].knobs.sequence_parallel == "megatron"


def test_validate_prints_cells(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD)
    out = bench("validate", str(path)).stdout
    _, cells = parse_suite(GOOD)
    for c in cells:
        assert c.id in out


def test_every_shipped_suite_validates_and_the_gpu_check_parses():
    """Each suite under suites/ (the GPU ones included, validated here on CPU)
    loads and expands; scripts/gpu_check.sh is valid bash."""
    from bench.config.suite import load_suite

    for path in sorted((ROOT / "suites").glob("*.yaml")):
        _, cells = load_suite(path)
        assert cells, path
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    # The scale-out suites: node layouts hold for every cell (checked at load),
    # and every cell has a memory prediction against the declared device.
    nightly, _ = load_suite(ROOT / "suites" / "nightly-8gpu.yaml")
    multi, cells = load_suite(ROOT / "suites" / "multinode.yaml")
    assert (nightly.nodes, nightly.nproc_per_node) == (1, 8) and (multi.nodes, multi.nproc_per_node) == (2, 8)
    assert multi.launcher == "slurm" and {c.knobs.world_size for c in cells} == {16}
    for name, n in (("nightly-8gpu", 32), ("multinode", 14)):
        out = " ".join(bench("validate", str(ROOT / "suites" / f"{name}.yaml")).stdout.split())
        assert out.count("memory: predicted") == n and "of 80.00 GiB per device" in out, name
