"""Trace analysis: reads the CSVs of a run folder (pandas only; never sim/, real/ or torch)."""
from analysis.goodput import GoodputResult, find_goodput
from analysis.metrics import Slo, compare_table, format_summary, request_latencies, slo_attainment, summarize
from traces.run_folder import Run, load_run

__all__ = [
    "request_latencies", "Slo", "slo_attainment", "summarize", "format_summary", "compare_table",
    "find_goodput", "GoodputResult", "load_run", "Run",
]
