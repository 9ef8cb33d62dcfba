"""Pruning reports: the JSON dict of DESIGN §5/§6 (keys in `schema`), written to disk and drawn
as a bar chart."""

from metaprune.report.figures import plot_sparsity
from metaprune.report.schema import REPORT_FIELDS, REPORT_FORMAT, REPORT_KEYS, ReportField
from metaprune.report.summary import build_report, format_summary, write_report

__all__ = ["REPORT_FIELDS", "REPORT_FORMAT", "REPORT_KEYS", "ReportField", "build_report",
           "format_summary", "plot_sparsity", "write_report"]
