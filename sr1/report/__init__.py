"""Reports over stored eval and training runs: paper-style tables, intervals, paired tests, plots.

``build_report`` assembles one JSON-able dict from the DuckDB store; ``render`` formats it.
"""

from sr1.report.build import build_report
from sr1.report.render import render

__all__ = ["build_report", "render"]
