"""Per-request latencies, SLO attainment and one flat run summary, read from trace tables only.

Everything here works on the DataFrames that `traces.schema.read_table` returns (pandas
"string" / "Int64" / float columns) and on plain hand-built frames alike, and is vectorised:
steps.csv can hold a few hundred thousand rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Default SLOs of sim.run and real.run (one place, so their runs compare): a chat service's targets.
DEFAULT_SLO_TTFT_MS = 1000.0
DEFAULT_SLO_TPOT_MS = 50.0

# Times are written rounded to 1e-9 s, so a latency exactly at the SLO may land a hair above it.
SLO_TOLERANCE_S = 1e-9


@dataclass(slots=True)
class Slo:
    """Latency targets a request must meet to count towards goodput (DistServe)."""
    ttft_s: float
    tpot_s: float


def _floats(column: pd.Series) -> np.ndarray:
    """Numbers as float64 with NaN for missing, whatever the pandas dtype (float, Int64, object)."""
    return pd.to_numeric(column, errors="coerce").astype(float).to_numpy(dtype=float, na_value=np.nan)


def _equals(column: pd.Series, value: str) -> np.ndarray:
    """Boolean mask column == value, missing values counting as False."""
    return np.asarray((column == value).fillna(False), dtype=bool)


def _latencies(requests: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(finished mask, ttft_s, tpot_s, e2e_s) arrays; latencies are NaN for unfinished requests."""
    finished = _equals(requests["status"], "finished")
    arrival = _floats(requests["arrival_s"])
    first = _floats(requests["first_token_s"])
    finish = _floats(requests["finish_s"])
    generated = _floats(requests["generated_tokens"])
    nan = np.full(len(requests), np.nan)
    ttft = np.where(finished, first - arrival, nan)
    e2e = np.where(finished, finish - arrival, nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(finished & (generated > 1), (finish - first) / (generated - 1), nan)
    return finished, ttft, tpot, e2e


def request_latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """A copy of `requests` with ttft_s, tpot_s, e2e_s added (NaN unless finished; tpot NaN for <= 1 token)."""
    _, ttft, tpot, e2e = _latencies(requests)
    return requests.assign(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e)


def _slo_met(requests: pd.DataFrame, slo: Slo) -> np.ndarray:
    finished, ttft, tpot, _ = _latencies(requests)
    one_token = _floats(requests["generated_tokens"]) <= 1
    ttft_ok = ttft <= slo.ttft_s + SLO_TOLERANCE_S
    tpot_ok = one_token | (tpot <= slo.tpot_s + SLO_TOLERANCE_S)
    return finished & ttft_ok & tpot_ok


def slo_attainment(requests: pd.DataFrame, slo: Slo) -> float:
    """Share of ALL requests that finished within both SLOs; failed and rejected are misses (DistServe).

    A request that produced a single token has no TPOT and only needs TTFT. NaN for no requests.
    """
    if len(requests) == 0:
        return math.nan
    return float(_slo_met(requests, slo).mean())


def interval_union_s(t_start_s: np.ndarray, t_end_s: np.ndarray) -> float:
    """Total length covered by the union of [start, end] intervals (overlaps counted once).

    Sort by start, take the running max of ends: a new busy segment begins wherever a start
    lies beyond every earlier end.
    """
    if len(t_start_s) == 0:
        return 0.0
    order = np.argsort(t_start_s, kind="stable")
    start = np.asarray(t_start_s, dtype=float)[order]
    reach = np.maximum.accumulate(np.asarray(t_end_s, dtype=float)[order])
    new_segment = np.empty(len(start), dtype=bool)
    new_segment[0] = True
    new_segment[1:] = start[1:] > reach[:-1]
    first = np.flatnonzero(new_segment)
    last = np.append(first[1:] - 1, len(start) - 1)
    return float(np.sum(reach[last] - start[first]))


def _pct(values: np.ndarray, q: float, scale: float = 1.0) -> float:
    values = values[~np.isnan(values)]
    return float(np.percentile(values, q)) * scale if len(values) else math.nan


def _mean(values: np.ndarray, scale: float = 1.0) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) * scale if len(values) else math.nan


def _per_s(amount: float, duration_s: float) -> float:
    return amount / duration_s if duration_s > 0 else math.nan


def _steps_summary(steps: pd.DataFrame, duration_s: float) -> dict:
    """Busy share of each device and the link, from the union of row intervals.

    attn and ffn rows on one GPU run at the same time on disjoint SM partitions, so their
    busy times must not be summed: the union of [t_start_s, t_end_s] counts a moment once.
    """
    start = _floats(steps["t_start_s"])
    end = _floats(steps["t_end_s"])
    device_codes, devices = pd.factorize(steps["device"])
    out = {}
    for device in ("gpu0", "gpu1", "link"):
        hits = np.flatnonzero(devices == device)
        mask = device_codes == hits[0] if len(hits) else np.zeros(len(steps), dtype=bool)
        out[f"{device}_busy_pct"] = 100.0 * _per_s(interval_union_s(start[mask], end[mask]), duration_s)
    transfer = _equals(steps["stage"], "transfer")
    out["transfer_gb"] = float(np.nansum(_floats(steps["kv_bytes"])[transfer])) / 1e9
    return out


def _decisions_summary(decisions: pd.DataFrame) -> dict:
    kind = decisions["decision"]
    return {
        "mode_changes": int(_equals(kind, "mode").sum()),
        "split_changes": int(_equals(kind, "split").sum()),
        "throttle_events": int(_equals(kind, "throttle").sum()),
        "preempt_decisions": int(_equals(kind, "preempt").sum()),
    }


def summarize(requests: pd.DataFrame, slo: Slo, *, steps: pd.DataFrame | None = None,
              decisions: pd.DataFrame | None = None, duration_s: float | None = None) -> dict:
    """One flat dict of readable numbers for a run (see SUMMARY_KEYS for the order and units).

    duration_s defaults to first arrival -> last finish. Latency statistics cover finished
    requests only and are NaN when none finished; output_tok_s counts every generated token,
    input_tok_s the prompts whose prefill completed (first_token_s set).
    """
    finished, ttft, tpot, e2e = _latencies(requests)
    if duration_s is None:
        arrival, finish = _floats(requests["arrival_s"]), _floats(requests["finish_s"])
        has_times = len(requests) and not np.isnan(arrival).all() and not np.isnan(finish).all()
        duration_s = float(np.nanmax(finish) - np.nanmin(arrival)) if has_times else math.nan
    duration_s = float(duration_s)
    prefilled = ~np.isnan(_floats(requests["first_token_s"]))
    summary = {
        "requests": len(requests),
        "finished": int(finished.sum()),
        "failed": int(_equals(requests["status"], "failed").sum()),
        "rejected": int(_equals(requests["status"], "rejected").sum()),
        "duration_s": duration_s,
        "throughput_rps": _per_s(float(finished.sum()), duration_s),
        "input_tok_s": _per_s(float(np.nansum(_floats(requests["prompt_tokens"])[prefilled])), duration_s),
        "output_tok_s": _per_s(float(np.nansum(_floats(requests["generated_tokens"]))), duration_s),
        "preemptions": int(np.nansum(_floats(requests["preemptions"]))),
        "ttft_p50_ms": _pct(ttft, 50, 1e3),
        "ttft_p99_ms": _pct(ttft, 99, 1e3),
        "ttft_mean_ms": _mean(ttft, 1e3),
        "tpot_p50_ms": _pct(tpot, 50, 1e3),
        "tpot_p99_ms": _pct(tpot, 99, 1e3),
        "tpot_mean_ms": _mean(tpot, 1e3),
        "e2e_p50_s": _pct(e2e, 50),
        "e2e_p99_s": _pct(e2e, 99),
        "slo_attainment": slo_attainment(requests, slo),
        "slo_ttft_ms": slo.ttft_s * 1e3,
        "slo_tpot_ms": slo.tpot_s * 1e3,
    }
    if steps is not None:
        summary.update(_steps_summary(steps, duration_s))
    if decisions is not None:
        summary.update(_decisions_summary(decisions))
    return summary


# key -> (group, label with unit, format); the order is the display order.
SUMMARY_KEYS: dict[str, tuple[str, str, str]] = {
    "requests": ("load", "requests", "{:.0f}"),
    "finished": ("load", "finished", "{:.0f}"),
    "failed": ("load", "failed", "{:.0f}"),
    "rejected": ("load", "rejected", "{:.0f}"),
    "duration_s": ("load", "duration (s)", "{:.2f}"),
    "throughput_rps": ("load", "throughput (req/s)", "{:.3f}"),
    "input_tok_s": ("load", "input (tok/s)", "{:.1f}"),
    "output_tok_s": ("load", "output (tok/s)", "{:.1f}"),
    "preemptions": ("load", "preemptions", "{:.0f}"),
    "ttft_p50_ms": ("latency", "TTFT p50 (ms)", "{:.1f}"),
    "ttft_p99_ms": ("latency", "TTFT p99 (ms)", "{:.1f}"),
    "ttft_mean_ms": ("latency", "TTFT mean (ms)", "{:.1f}"),
    "tpot_p50_ms": ("latency", "TPOT p50 (ms)", "{:.2f}"),
    "tpot_p99_ms": ("latency", "TPOT p99 (ms)", "{:.2f}"),
    "tpot_mean_ms": ("latency", "TPOT mean (ms)", "{:.2f}"),
    "e2e_p50_s": ("latency", "E2E p50 (s)", "{:.3f}"),
    "e2e_p99_s": ("latency", "E2E p99 (s)", "{:.3f}"),
    "slo_attainment": ("SLO", "attainment", "{:.1%}"),
    "slo_ttft_ms": ("SLO", "TTFT target (ms)", "{:.0f}"),
    "slo_tpot_ms": ("SLO", "TPOT target (ms)", "{:.1f}"),
    "gpu0_busy_pct": ("GPUs", "GPU0 busy (%)", "{:.1f}"),
    "gpu1_busy_pct": ("GPUs", "GPU1 busy (%)", "{:.1f}"),
    "link_busy_pct": ("GPUs", "link busy (%)", "{:.1f}"),
    "transfer_gb": ("GPUs", "KV transferred (GB)", "{:.3f}"),
    "mode_changes": ("policy", "mode changes", "{:.0f}"),
    "split_changes": ("policy", "split changes", "{:.0f}"),
    "throttle_events": ("policy", "throttle events", "{:.0f}"),
    "preempt_decisions": ("policy", "preempt decisions", "{:.0f}"),
}
GROUPS = ("load", "latency", "SLO", "GPUs", "policy", "other")


def _format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float, np.integer, np.floating)):
        fmt = SUMMARY_KEYS[key][2] if key in SUMMARY_KEYS else "{:.4g}"
        return fmt.format(value)
    return str(value)


def format_summary(summary: dict, title: str = "") -> str:
    """A fixed-width, grouped table of a summary for the terminal; unknown keys go under "other"."""
    rows: dict[str, list[tuple[str, str]]] = {g: [] for g in GROUPS}
    for key in [k for k in SUMMARY_KEYS if k in summary] + [k for k in summary if k not in SUMMARY_KEYS]:
        group, label, _ = SUMMARY_KEYS.get(key, ("other", key, ""))
        rows[group].append((label, _format_value(key, summary[key])))
    label_w, value_w = 24, 12
    lines = [f"== {title} =="] if title else []
    for group in GROUPS:
        if rows[group]:
            lines.append(f"{group}")
            lines += [f"  {label:<{label_w}}{value:>{value_w}}" for label, value in rows[group]]
    return "\n".join(lines)


def compare_table(summaries: dict[str, dict], keys: list[str] | None = None) -> pd.DataFrame:
    """Runs side by side: one row per run label, one column per summary key (NaN where a run lacks it).

    Default keys: every key any summary has, known keys in SUMMARY_KEYS order first.
    """
    if keys is None:
        present = list(dict.fromkeys(k for s in summaries.values() for k in s))
        keys = [k for k in SUMMARY_KEYS if k in present] + [k for k in present if k not in SUMMARY_KEYS]
    return pd.DataFrame([[s.get(k, math.nan) for k in keys] for s in summaries.values()],
                        index=pd.Index(list(summaries), name="run"), columns=list(keys))
