"""The CLI's two rich consoles: results on stdout, errors on stderr (no markup, no highlighting)."""
from __future__ import annotations

from rich.console import Console

console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)
