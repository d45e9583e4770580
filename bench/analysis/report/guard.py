"""One bad record never stops a report. Records that pass ``record_check`` can
still hold values a section cannot use (a hand-edited theory, a profile of
another shape): a section that raises is retried record by record, the records
it cannot take are left out of that section only, and each is named on the page
("N record(s) skipped") with the error. On real runs nothing is left out
(tests/test_report_and_export.py asserts it), so this never hides a bug there."""
from __future__ import annotations

from typing import Any, Callable


class Guard:
    def __init__(self, skipped: list[str]) -> None:
        self.skipped = skipped

    def section(self, name: str, fn: Callable[[list[dict[str, Any]]], Any], records: list[dict[str, Any]],
                empty: Any = None) -> Any:
        try:
            return fn(records)
        except Exception:  # noqa: BLE001 - any failure of one section is reported, not raised
            keep = self._probe(f"left out of {name}", fn, records)
        try:
            return fn(keep)
        except Exception as exc:  # noqa: BLE001 - a failure that needs several records together
            self.skipped.append(f"{name}: not shown: {type(exc).__name__}: {exc}"[:300])
            return empty

    def usable(self, name: str, fn: Callable[[list[dict[str, Any]]], Any],
               records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
        """The records ``fn`` can take (all of them when it takes the lot, else those it
        takes one by one) and ``fn`` of those records (None when it takes none)."""
        try:
            return records, fn(records)
        except Exception:  # noqa: BLE001
            keep = self._probe(f"skipped ({name})", fn, records)
        return keep, fn(keep) if keep else None

    def _probe(self, what: str, fn: Callable[[list[dict[str, Any]]], Any],
               records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records ``fn`` takes alone; each one it cannot is named in ``skipped``."""
        keep = []
        for r in records:
            try:
                fn([r])
                keep.append(r)
            except Exception as exc:  # noqa: BLE001
                self.skipped.append(f"cell {r.get('cell_id')}: {what}: {type(exc).__name__}: {exc}"[:300])
        return keep
