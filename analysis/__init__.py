"""Trace analysis: reads the CSVs of a run folder (pandas only; never sim/, real/ or torch)."""
from analysis.goodput import GoodputResult, find_goodput
from analysis.metrics import Slo, compare_table, format_summary, request_latencies, slo_attainment, summarize

# Run-folder loading (load_run, from traces) is added here by its own task.

__all__ = [
    "request_latencies", "Slo", "slo_attainment", "summarize", "format_summary", "compare_table",
    "find_goodput", "GoodputResult",
]
