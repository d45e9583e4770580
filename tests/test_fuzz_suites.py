"""Property-based fuzzing of suite files (#27). Two generators: arbitrary YAML
documents, and structured mutations of a valid suite (wrong types, boundary
degrees, unknown and misspelt keys, huge and empty matrices, hostile names,
deep nesting, duplicate keys, aliases and tags). Property: a suite is either
accepted, and then every expanded cell validates again from its resolved knobs,
or refused with `SuiteError` whose message names the field; through the CLI,
`bench validate` / `bench run` exit 0 or 2, print no traceback, launch nothing
for a refused suite and write no file outside the results folder.

Budgets: tests/fuzz_profiles.py (`ci` fixed seed; TRAINBENCH_FUZZ=nightly for 10×).
"""
from __future__ import annotations

import copy
import os
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bench import cli
from bench.config.knobs import KNOB_NAMES, Knobs
from bench.config.suite import SuiteError, Suite, parse_suite
from tests.fuzz_profiles import examples

BASE = {
    "name": "fuzz", "steps": 2, "warmup": 1, "timeout_s": 60, "seed": 0,
    "defaults": {"model": "tiny", "device": "cpu", "world_size": 2, "batch_size": 8, "seq_len": 64},
    "matrix": {"adapter": ["inhouse", "torch"], "zero": [0, 1]},
    "include": [{"adapter": "inhouse", "microbatches": 2}],
}
SETTINGS = tuple(k for k in Suite.model_fields if k not in ("defaults", "matrix", "include", "exclude"))
def _base_type(annotation) -> type | None:
    """int or str: what a knob's values are (Literal of str/int, int, int | None)."""
    args = typing.get_args(annotation)
    if annotation is int or (args and set(args) <= {int, type(None)}):
        return int
    if args and all(isinstance(a, str) for a in args):
        return str
    if args and all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return int
    return str if annotation is str else None


KNOB_TYPES = {name: _base_type(f.annotation) for name, f in Knobs.model_fields.items()}
OPTIONAL = {name for name, f in Knobs.model_fields.items() if type(None) in typing.get_args(f.annotation)}


def wrong_type(knob: str, value) -> bool:
    """A value no knob of that type can hold: a list or mapping, None where the knob is not
    optional, a bool, or a str for an int knob and an int or float for a str knob."""
    want = KNOB_TYPES[knob]
    if isinstance(value, (list, dict)) or isinstance(value, bool):
        return True
    if value is None:
        return knob not in OPTIONAL
    return (want is int and not isinstance(value, int)) or (want is str and not isinstance(value, str))


DEGREES = ("world_size", "dp", "tp", "cp", "pp", "microbatches", "virtual_stages", "tp_depth", "batch_size", "seq_len")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["../../etc/passwd", "/tmp/x", "inhouse\n", "1e309", "0x10", "nan", "~", "<script>x</script>",
                     "ÿ", "😀", "\x00"]),
)
hostile = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)


def nested(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def near_valid(knob: str):
    """Values one coercion away from valid: what a lax validator would let through."""
    if KNOB_TYPES[knob] is int:
        return st.sampled_from([2.0, 1.0, "2", "1", True, [2], 2.5, "0x2"])
    return st.sampled_from([1, 0, True, ["inhouse"], None, 2.0])


def misspell(name: str, data) -> str:
    i = data.draw(st.integers(0, len(name) - 1))
    how = data.draw(st.sampled_from(["drop", "swap", "insert", "case"]))
    if how == "drop":
        return name[:i] + name[i + 1:]
    if how == "swap" and i + 1 < len(name):
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    if how == "case":
        return name.upper()
    return name[:i] + data.draw(st.sampled_from("xqz_")) + name[i:]


@st.composite
def mutated_suites(draw):
    """(YAML text, the field the mutation touched or None when any message will do, the
    mutation's kind, whether the suite must be refused)."""
    suite = copy.deepcopy(BASE)
    must_refuse = True
    kind = draw(st.sampled_from(["knob_value", "setting_value", "misspelt_knob", "unknown_setting", "degree",
                                 "huge_matrix", "empty_matrix", "name", "deep", "duplicate_key", "alias", "tag"]))
    field = None
    if kind == "knob_value":
        # Half the draws on the parallel degrees, the knobs most often mistyped.
        field = draw(st.one_of(st.sampled_from(DEGREES), st.sampled_from(KNOB_NAMES)))
        where = draw(st.sampled_from(["defaults", "include", "matrix"]))
        value = draw(st.one_of(hostile, near_valid(field)))
        # A default every cell overrides (adapter: the matrix and the include both set it) reaches no cell.
        must_refuse = wrong_type(field, value) and not (where == "defaults" and field == "adapter")
        if where == "defaults":
            suite["defaults"][field] = value
        elif where == "include":
            suite["include"][0][field] = value
        else:
            suite["matrix"][field] = [value]
    elif kind == "setting_value":
        field = draw(st.sampled_from(SETTINGS))
        suite[field] = draw(hostile)
        must_refuse = isinstance(suite[field], dict) and field not in ("slurm", "quality")  # the settings that are mappings
    elif kind == "misspelt_knob":
        field = misspell(draw(st.sampled_from(KNOB_NAMES)), draw(st.data()))
        if field in KNOB_NAMES:
            field = field + "_x"
        suite["defaults"][field] = 2
    elif kind == "unknown_setting":
        field = misspell(draw(st.sampled_from(SETTINGS)), draw(st.data()))
        if field in Suite.model_fields:
            field = field + "_x"
        suite[field] = 1
    elif kind == "degree":
        for name in draw(st.lists(st.sampled_from(DEGREES), min_size=1, max_size=3, unique=True)):
            suite["defaults"][name] = draw(st.integers(min_value=-3, max_value=2**62))
        must_refuse = min(v for k, v in suite["defaults"].items() if k in DEGREES) < 1
    elif kind == "huge_matrix":
        n = draw(st.integers(11, 40))
        suite["matrix"] = {k: list(range(1, n + 1)) for k in ("batch_size", "seq_len", "microbatches")}
        field = "matrix"
    elif kind == "empty_matrix":
        field = draw(st.sampled_from(KNOB_NAMES))
        suite["matrix"][field] = []
    elif kind == "name":
        suite["name"] = draw(st.one_of(st.text(max_size=80), st.sampled_from(["../up", "a/b", "<b>x</b>", "", "."])))
        field = "name"
        must_refuse = any(c in suite["name"] for c in "/<>\\ ") or suite["name"] in ("", ".", "..")
    elif kind == "deep":
        field = draw(st.sampled_from([k for k in KNOB_NAMES if k != "adapter"]))  # adapter: overridden everywhere
        suite["defaults"][field] = nested(draw(st.integers(2, 200)))
    text = yaml.safe_dump(suite, allow_unicode=True, sort_keys=False)
    if kind == "duplicate_key":
        field = draw(st.sampled_from(["tp", "zero", "world_size"]))
        text = text.replace("defaults:\n", f"defaults:\n  {field}: 1\n  {field}: 2\n", 1)
    elif kind == "alias":
        text = text.replace("defaults:", "defaults: &d", 1) + "exclude: [*d]\n"
        field = "alias"
    elif kind == "tag":
        text = text.replace("steps: 2", "steps: !!python/object/apply:os.system ['touch pwned']", 1)
        field = "malformed YAML"
    return text, field, kind, must_refuse


def _check_accepted(cells) -> None:
    for cell in cells:
        again = Knobs.model_validate(cell.knobs.resolved())  # resolved knobs validate on their own
        assert again == cell.knobs


def _names_field(message: str, field: str | None, kind: str) -> bool:
    if field is None:
        return True
    if kind == "degree":
        return any(name in message for name in (*DEGREES, "degree"))
    if kind == "name":
        return "name" in message
    if kind == "huge_matrix":
        return "exceed the cap" in message
    if kind == "alias":
        return "aliases" in message
    if kind == "duplicate_key":
        return f"duplicate key {field!r}" in message
    if kind == "knob_value" and field in ("dp",):  # dp is checked against the other degrees
        return "dp" in message
    return field in message


@settings(max_examples=examples(1000))
@given(mutated_suites())
def test_mutated_suites_are_accepted_or_refused_naming_the_field(case):
    text, field, kind, must_refuse = case
    try:
        _, cells = parse_suite(text)
    except SuiteError as exc:
        event(f"{kind}: refused")
        assert _names_field(str(exc), field, kind), (kind, field, str(exc)[:500])
        return
    event(f"{kind}: accepted")
    assert not must_refuse, (kind, field, text[:800])
    _check_accepted(cells)


yaml_documents = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(
        st.one_of(st.sampled_from([*KNOB_NAMES, *Suite.model_fields]), st.text(max_size=10)), inner, max_size=6)),
    max_leaves=25)


@settings(max_examples=examples(1000))
@given(st.one_of(yaml_documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=300)))
def test_arbitrary_yaml_is_accepted_or_refused_cleanly(text):
    try:
        _, cells = parse_suite(text)
    except SuiteError as exc:
        event("refused")
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    event("accepted")
    _check_accepted(cells)


class _NoLaunch(Exception):
    pass


@pytest.fixture
def no_launch(monkeypatch):
    """Any launcher or runner built from a suite fails the test: refused suites launch nothing."""
    import bench.run.launchers.choose as choose
    import bench.run.runner as runner

    def refuse(*args, **kwargs):
        raise _NoLaunch("a refused suite reached the launcher")

    monkeypatch.setattr(choose, "make_launcher", refuse)
    monkeypatch.setattr(runner, "Runner", refuse)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@settings(max_examples=examples(60))
@given(st.one_of(mutated_suites().map(lambda c: c[0]), yaml_documents.map(yaml.safe_dump)))
def test_cli_refuses_without_traceback_launch_or_stray_files(tmp_path_factory, no_launch, capsys, text):
    work = tmp_path_factory.mktemp("fuzz-cli")
    (work / "suite.yaml").write_text(text)
    try:
        _, cells = parse_suite(text)
        accepted = True
    except SuiteError:
        accepted = False
    before = _tree(work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code_validate = cli.main(["validate", "suite.yaml"])
        code_run = None if accepted else cli.main(["run", "suite.yaml", "--results", "results", "--no-progress"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    if accepted:
        assert code_validate == 0
    else:
        assert (code_validate, code_run) == (2, 2), out.err
        assert "error:" in out.err
    assert _tree(work) == before  # validate writes nothing; a refused run not even its results folder
    assert not (work / "pwned").exists()
