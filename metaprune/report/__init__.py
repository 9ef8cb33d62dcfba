"""Pruning reports: the JSON dict of DESIGN §5, written to disk and drawn as a bar chart."""

from metaprune.report.figures import plot_sparsity
from metaprune.report.summary import REPORT_KEYS, build_report, format_summary, write_report

__all__ = ["REPORT_KEYS", "build_report", "format_summary", "plot_sparsity", "write_report"]
