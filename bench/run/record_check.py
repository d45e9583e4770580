"""The shape a record must have before any analysis reads it.

Result files arrive truncated by a full disk, merged by hand, written by an
older TrainBench or edited on another machine. ``check_record`` validates the
fields the analysis commands (report, compare, history, explain, export) read,
with their types; a record that fails is skipped and counted by the reader
(``bench.run.results.read_records``), with the field that failed, so one bad
line never stops a report. Non-finite floats become null, as the writer
stores them (``results.finite``). Fields the schema does not name pass through
as they are (``extra='allow'``): notes and theory are free-form.
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Scalar = str | int | float | bool | None
Number = int | float


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Launch(_Open):
    median_s: Number | None = None


class CommKind(_Open):
    calls: int | None = None
    bytes: Number | None = None
    bus_bytes: Number | None = None
    time_s: Number | None = None


class Metrics(_Open):
    step_time_s: list[Number] = Field(default_factory=list)
    step_time_median_s: Number | None = None
    step_time_ci_s: list[Number | None] | None = None
    tokens_per_s: Number | None = None
    peak_mem_bytes: Number | None = None
    peak_rss_bytes: Number | None = None
    comm_bytes_per_step: Number | None = None
    comm: dict[str, CommKind] = Field(default_factory=dict)
    losses: list[Number | None] = Field(default_factory=list)
    model_state_bytes: dict[str, Number | None] | None = None
    launches: list[Launch] | None = None
    launch_cv: Number | None = None
    mfu: Number | None = None

    @field_validator("launches")
    @classmethod
    def _launch_medians(cls, value: list[Launch] | None) -> list[Launch] | None:
        if value is not None and any(launch.median_s is None for launch in value):
            raise ValueError("every launch needs a finite median_s")
        return value


class Env(_Open):
    start_time: str | None = None
    host: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    git_sha: str | None = None
    git_dirty: bool | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)


class Record(_Open):
    schema_version: int = Field(default=1, ge=1)
    suite: str
    run_id: str
    cell_id: str
    cell_label: str | None = None
    adapter: str
    status: str
    reason: str | None = None
    config: dict[str, Scalar]
    metrics: Metrics | None = None
    theory: dict[str, Any] | None = None
    theory_ratio: dict[str, Number | None] | None = None
    notes: dict[str, Any] | None = None
    techniques: list[str] | None = None
    env: Env = Field(default_factory=Env)

    @field_validator("metrics")
    @classmethod
    def _ok_has_times(cls, value: Metrics | None, info) -> Metrics | None:
        if value is not None and info.data.get("status") == "ok" and value.step_time_median_s is None:
            raise ValueError("an ok record needs metrics.step_time_median_s")
        return value


def check_record(record: Any) -> str | None:
    """None when the record is fit to analyse, else what is wrong (the field and why)."""
    return normalised(record)[1]


def normalised(record: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the record with every field the analysis reads present and typed, None), or (None, what is wrong)."""
    if not isinstance(record, dict):
        return None, f"a record is a JSON object, got {type(record).__name__}"
    try:
        model = Record.model_validate(_nonfinite_as_null(record))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        return None, f"{where}: {err['msg']}"
    checked = model.model_dump(exclude_unset=True)
    checked["env"] = model.env.model_dump()  # every field: the report reads them one by one
    # Every top-level field present (absent ones at their default); nested ones as written.
    for name, field in Record.model_fields.items():
        if name not in checked:
            checked[name] = field.get_default(call_default_factory=True)
    return checked, None


def _nonfinite_as_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nonfinite_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nonfinite_as_null(v) for v in value]
    return value
