"""Suite files: parsed once, at the door, into typed and validated objects.

A suite is ``name``, ``defaults`` (knobs), ``matrix`` (knob -> list; the
cartesian product, each cell overlaid on ``defaults``), ``include`` (each entry
adds one cell: defaults overlaid by the entry), ``exclude`` (each entry removes
every product cell matching all its keys), and run settings. Every cell is
validated before anything launches; every error names the field and value.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench.config.knobs import KNOB_NAMES, Knobs, identity
from bench.config.slurm import SlurmSettings

MAX_CELLS = 1000
"""Matrices larger than this need ``--force`` (a typo can otherwise queue a night of runs)."""


class SuiteError(ValueError):
    """A suite that cannot run; ``problems`` lists every reason, each naming its field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source}: invalid suite\n" + "\n".join(f"  - {p}" for p in problems))


REFERENCE = {"optimizer": "adamw", "precision": "fp32", "attention": "dense", "pp_schedule": "1f1b"}
"""The quality axis's default reference: fp32 AdamW, dense attention, synchronous pipeline."""


class QualitySettings(BaseModel):
    """The quality axis (bench.run.quality, bench.analysis.convergence, docs/convergence.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    target_loss: float | None = Field(default=None, gt=0)
    """Loss (nats per token, trailing mean) a cell must reach: its record gets
    steps-, tokens- and time-to-target (MLPerf style). None: not measured."""
    window: int = Field(default=10, ge=1, le=10_000)
    """Steps in the trailing mean of the per-step losses (each step's batch is
    new, so its loss before the update is a held-out loss)."""
    reference: dict[str, Any] = Field(default_factory=lambda: dict(REFERENCE))
    """Knob values of the reference cell each cell's loss is compared with, at
    equal tokens (same model and seq_len; the same batch size where there is
    one, then the cell sharing most knob values)."""

    @field_validator("reference")
    @classmethod
    def _knobs_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(KNOB_NAMES))
        if unknown:
            raise ValueError(f"unknown knob(s) {unknown}; a reference names knob values")
        return v


class RunSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    steps: int = Field(default=10, ge=1, le=100_000)
    """Timed steps per cell."""
    warmup: int = Field(default=2, ge=1, le=10_000)
    """Untimed steps before timing: build + warm-up measure CPU memory, the last
    warm-up step is the communication-metered one, so at least one is needed."""
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 24 * 3600)
    """Wall-clock limit per cell; the whole process group is killed past it."""
    seed: int = Field(default=0, ge=0)
    repeat: int = Field(default=1, ge=1, le=1000)
    """Launches per cell (fresh rank processes each), interleaved across cells in a
    seeded random order; the cell's step time is the median of its launch medians,
    with a confidence interval across launches (bench.run.launch_stats). 1 for a
    quick look; 5 or more where runs are compared (`bench compare` needs 5 per side)."""
    launcher: Literal["local", "warm", "torchrun", "slurm"] = "local"
    """`local`: this host — the warm fork-server launcher for one-node cells
    (bench.run.launchers.warm), this node's torchrun agent when `nodes` > 1;
    `warm` / `torchrun`: that local launcher explicitly (`warm` is one-node only);
    `slurm`: one sbatch job per cell running `srun torchrun` (bench.run.launchers.slurm)."""
    nodes: int = Field(default=1, ge=1, le=4096)
    """Nodes one cell spans (torchrun --nnodes); > 1 needs `nproc_per_node`, and
    every cell's world_size must then equal nodes × nproc_per_node."""
    nproc_per_node: int | None = Field(default=None, ge=1, le=1024)
    """Ranks (GPUs) per node; none: each cell's world_size on one node."""
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")
    """HOST:PORT of the c10d rendezvous (node 0) for `launcher: local` with `nodes` > 1."""
    device_memory_gib: float | None = Field(default=None, gt=0)
    """Memory per device for the pre-launch fit check (bench.plan.fit); none: the
    visible CUDA device's total for cuda cells, no check for cpu cells."""
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    """sbatch settings for `launcher: slurm`."""
    profile: bool | list[dict[str, Any]] = False
    """One extra, untimed step under torch.profiler after the timed ones
    (bench.meters.profile): `true` for every cell, or a list of knob selectors
    (like `exclude` entries) naming the cells to profile. Not a knob: cell ids
    do not change."""
    machine_profile: str | None = None
    """Machine profile JSON for the planner (`strategy: auto`, `predict`); none:
    results/machine_profiles/<host>.json for cpu cells (calibrated when absent),
    the GPU peak table with a default α–β for cuda cells (bench.plan.planner)."""
    predict: bool = False
    """Attach the planner's predicted step time and memory to every training cell (notes.plan)."""
    quality: QualitySettings = Field(default_factory=QualitySettings)
    """Target loss, loss window and reference cell of the quality axis
    (metrics.convergence in every training record)."""

    def profiles(self, knobs: Knobs) -> bool:
        """Whether the cell with these knobs gets the profiled step."""
        if isinstance(self.profile, bool):
            return self.profile
        config = knobs.resolved()
        return any(all(_same(config.get(k), v) for k, v in sel.items()) for sel in self.profile)


class Suite(RunSettings):
    """The validated suite: run settings plus the cell matrix. The raw knob
    mappings stay inside; callers use the ``Cell`` list from ``expand``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    defaults: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def run(self) -> RunSettings:
        return RunSettings(**{k: getattr(self, k) for k in RunSettings.model_fields})


@dataclass(frozen=True, slots=True)
class Cell:
    """One fully resolved configuration with a stable id (hash of the resolved knobs)."""

    index: int
    label: str
    knobs: Knobs
    plan: dict[str, Any] | None = None
    """`strategy: auto` or `predict`: the planner's choice and prediction (bench.plan.planner)."""

    @property
    def id(self) -> str:
        return cell_id(self.knobs)


def cell_id(knobs: Knobs) -> str:
    canonical = json.dumps(identity(knobs.resolved()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a suite never needs them, and an alias
    bomb (billion laughs) must not reach the expander."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in suite files", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN201 - PyYAML signature
        """A key given twice is an error (PyYAML keeps the last one silently)."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a key may appear once per mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_suite(path: str | Path, *, max_cells: int = MAX_CELLS) -> tuple[Suite, list[Cell]]:
    """Read, validate and expand a suite file. Raises ``SuiteError`` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    return parse_suite(text, source=str(path), max_cells=max_cells)


def parse_suite(text: str, *, source: str = "<suite>", max_cells: int = MAX_CELLS) -> tuple[Suite, list[Cell]]:
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise SuiteError(source, [f"malformed YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise SuiteError(source, [f"the top level must be a mapping of suite fields, got {type(raw).__name__}"])
    problems = _unknown_keys(raw, tuple(Suite.model_fields), "suite field")
    if problems:
        raise SuiteError(source, problems)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise SuiteError(source, _describe(exc, prefix="")) from None
    cells = expand(suite, source=source, max_cells=max_cells)
    return suite, cells


def expand(suite: Suite, *, source: str = "<suite>", max_cells: int = MAX_CELLS) -> list[Cell]:
    """defaults × matrix − exclude + include, each validated; duplicates are dropped."""
    problems: list[str] = []
    problems += _unknown_keys(suite.defaults, KNOB_NAMES, "knob", where="defaults")
    problems += _unknown_keys(suite.matrix, KNOB_NAMES, "knob", where="matrix")
    for i, entry in enumerate(suite.exclude):
        problems += _unknown_keys(entry, KNOB_NAMES, "knob", where=f"exclude[{i}]")
    for i, entry in enumerate(suite.include):
        problems += _unknown_keys(entry, KNOB_NAMES, "knob", where=f"include[{i}]")
    for i, entry in enumerate(suite.profile if isinstance(suite.profile, list) else []):
        problems += _unknown_keys(entry, KNOB_NAMES, "knob", where=f"profile[{i}]")
    for knob, values in suite.matrix.items():
        if not values:
            problems.append(f"matrix.{knob}: the list of values is empty")
    if problems:
        raise SuiteError(source, problems)

    keys = list(suite.matrix)
    n_product = 1
    for values in suite.matrix.values():
        n_product *= len(values)
    if n_product + len(suite.include) > max_cells:
        raise SuiteError(
            source,
            [f"matrix: {n_product + len(suite.include)} cells exceed the cap of {max_cells} (pass --force to run anyway)"],
        )

    candidates: list[tuple[str, dict[str, Any]]] = []
    for n, combo in enumerate(itertools.product(*(suite.matrix[k] for k in keys))):
        overlay = dict(zip(keys, combo))
        if any(all(_same(overlay.get(k, suite.defaults.get(k)), v) for k, v in ex.items()) for ex in suite.exclude):
            continue
        candidates.append((f"matrix cell {n}", {**suite.defaults, **overlay}))
    for i, entry in enumerate(suite.include):
        candidates.append((f"include[{i}]", {**suite.defaults, **entry}))

    cells: list[Cell] = []
    seen: set[str] = set()
    for label, values in candidates:
        try:
            knobs = Knobs.model_validate(values)
        except ValidationError as exc:
            problems += _describe(exc, prefix=f"{label}: ")
            continue
        if knobs.framework_config == "tuned" and "tuning_candidate" not in values:
            # One cell per candidate of the tuning space; the analysis keeps the best.
            from bench.config.framework_config import tuning_space

            for i in range(1, len(tuning_space(knobs))):
                candidates.append((f"{label} (tuning candidate {i})", {**values, "tuning_candidate": i}))
        plan = None
        if knobs.strategy == "auto" or suite.predict:  # resolved before launch: the best plan's knobs
            from bench.plan.planner import attach

            try:
                knobs, plan = attach(knobs, suite)
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
                continue
        cell = Cell(index=len(cells), label=label, knobs=knobs, plan=plan)
        if cell.id in seen:
            continue
        seen.add(cell.id)
        cells.append(cell)
    if problems:
        raise SuiteError(source, problems)
    if not cells:
        raise SuiteError(source, ["the suite expands to no cells (matrix, exclude and include leave nothing)"])
    problems = placement_problems(suite, cells)
    if problems:
        raise SuiteError(source, problems)
    return cells


def placement_problems(run: RunSettings, cells: list[Cell]) -> list[str]:
    """Node-level settings against every cell: a multi-node cell uses every rank
    of every node; a one-node cell must fit on the node."""
    problems = []
    if run.nodes > 1 and run.nproc_per_node is None:
        problems.append(f"nproc_per_node: required when nodes = {run.nodes} (ranks per node)")
    if run.nodes > 1 and run.launcher in ("local", "torchrun") and run.rdzv_endpoint is None:
        problems.append(f"rdzv_endpoint: required when nodes = {run.nodes} and launcher = '{run.launcher}' "
                        "(HOST:PORT of node 0)")
    if run.nodes > 1 and run.launcher == "warm":
        problems.append(f"launcher: 'warm' starts one node's ranks; nodes = {run.nodes} needs 'local' or 'torchrun' "
                        "(a torchrun agent per node) or 'slurm'")
    if run.nproc_per_node is None:
        return problems
    for c in cells:
        ws = c.knobs.world_size
        if run.nodes > 1 and ws != run.nodes * run.nproc_per_node:
            problems.append(f"{c.label}: world_size = {ws} but nodes × nproc_per_node = "
                            f"{run.nodes} × {run.nproc_per_node} = {run.nodes * run.nproc_per_node}")
        elif run.nodes == 1 and ws > run.nproc_per_node:
            problems.append(f"{c.label}: world_size = {ws} exceeds nproc_per_node = {run.nproc_per_node} (nodes = 1)")
    return problems


def _same(a: Any, b: Any) -> bool:
    # YAML `true` must not match `1`.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _unknown_keys(mapping: Any, known: tuple[str, ...], what: str, where: str = "") -> list[str]:
    if not isinstance(mapping, dict):
        return [f"{where or 'suite'}: expected a mapping, got {type(mapping).__name__}"]
    problems = []
    for key in mapping:
        if not isinstance(key, str) or key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}"
            prefix = f"{where}: " if where else ""
            problems.append(f"{prefix}unknown {what} {key!r}{suggestion}")
    return problems


def _describe(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "value"
        msg = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        if err["type"] == "value_error" or field == "value" or isinstance(shown, dict):
            out.append(f"{prefix}{field}: {msg}" if field != "value" else f"{prefix}{msg}")
        else:
            out.append(f"{prefix}{field} = {shown!r}: {msg}")
    return out
