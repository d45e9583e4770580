"""HTML reports. Read only result files: no torch, no impl imports."""
from bench.analysis.report.build import write_report

__all__ = ["write_report"]
