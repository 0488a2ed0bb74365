"""A report of one or more run folders: report.md, PNG plots and a Perfetto trace.json.

    python -m analysis.report runs/A runs/B [--out DIR] [--slo-ttft-ms 1000 --slo-tpot-ms 50]

Everything is read from the run folders (traces only), so a sim run and a real run report alike.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.metrics import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS, SUMMARY_KEYS, Slo, compare_table, \
    request_latencies, summarize
from traces.run_folder import Run, load_run
from traces.schema import DEVICES, MODES, TraceSchemaError

TIMELINE_WINDOW_S = 5.0  # the timeline shows only the first seconds: whole runs hold 1e5 bars
MAX_THROUGHPUT_BINS = 200  # 1 s bins, widened so a long run stays under this many
LANES = ("gpu0", "link", "gpu1")  # timeline order: prefill GPU, KV copy, decode GPU


def _floats(column: pd.Series) -> np.ndarray:
    return pd.to_numeric(column, errors="coerce").astype(float).to_numpy(dtype=float, na_value=np.nan)


def run_labels(runs: list[Run]) -> list[str]:
    """Folder names, suffixed #2, #3 when two runs share one, so plot legends stay distinct."""
    labels, seen = [], {}
    for run in runs:
        name = run.path.resolve().name
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def run_policy(run: Run) -> str:
    return str(run.info.get("policy") or run.summary.get("policy") or "?")


def run_summary(run: Run, slo: Slo) -> dict:
    """summarize() recomputed from the tables (not summary.json), so every run uses the same SLO."""
    summary = summarize(run.requests, slo, steps=run.steps, decisions=run.decisions)
    summary["policy"] = run_policy(run)
    return summary


def _named(value) -> str:
    """hardware / model in run.json are dicts with a name (sim) or may be plain strings."""
    if isinstance(value, dict):
        return str(value.get("name", "?"))
    return "?" if value is None else str(value)


def format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (SUMMARY_KEYS[key][2] if key in SUMMARY_KEYS else "{:.4g}").format(value)
    return str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(runs: list[Run], labels: list[str], summaries: list[dict], plots: list[str]) -> str:
    """The runs (policy/hardware/model), their summaries side by side (metric rows), then the plots."""
    info_rows = [[label, run_policy(r), str(r.info.get("backend", "?")), _named(r.info.get("hardware")),
                  _named(r.info.get("model")), str(r.path)] for r, label in zip(runs, labels)]
    table = compare_table(dict(zip(labels, summaries)))
    metric_rows = []
    for key in table.columns:
        label = SUMMARY_KEYS[key][1] if key in SUMMARY_KEYS else key
        metric_rows.append([label] + [format_value(key, table.at[run, key]) for run in table.index])
    out = ["# pdlab report", "", "## Runs", "",
           _md_table(["run", "policy", "backend", "hardware", "model", "folder"], info_rows), "",
           "## Summary", "", _md_table(["metric"] + labels, metric_rows), "", "## Plots", ""]
    out += [f"![{Path(p).stem}]({p})" for p in plots]
    out += ["", "trace.json: open in https://ui.perfetto.dev (one process per run, one thread per device/stage).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- plots

def _figure(nrows: int = 1, height_in: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, 1, figsize=(9, height_in * nrows), squeeze=False)
    return fig, axes[:, 0]


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plot_latency_cdfs(runs: list[Run], labels: list[str], path: Path) -> str:
    """TTFT and TPOT CDFs, one line per run: tails show where the percentiles hide differences."""
    fig, (ax_ttft, ax_tpot) = _figure(2, 3.5)
    for run, label in zip(runs, labels):
        lat = request_latencies(run.requests)
        for ax, col in ((ax_ttft, "ttft_s"), (ax_tpot, "tpot_s")):
            ms = np.sort(lat[col].to_numpy(dtype=float)) * 1e3
            ms = ms[~np.isnan(ms)]
            if len(ms):
                ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=label)
    for ax, name in ((ax_ttft, "TTFT (ms)"), (ax_tpot, "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def throughput_bin_s(duration_s: float) -> float:
    """1 s bins, widened so a long run has at most MAX_THROUGHPUT_BINS of them."""
    if not duration_s > 0:
        return 1.0
    return max(1.0, math.ceil(duration_s / MAX_THROUGHPUT_BINS))


def finished_per_s(requests: pd.DataFrame, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin start s, finished requests per second) of requests that finished."""
    finish = _floats(requests["finish_s"])[np.asarray((requests["status"] == "finished").fillna(False), bool)]
    if len(finish) == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, float(finish.max()) + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, bin_s])
    counts, _ = np.histogram(finish, bins=edges)
    return edges[:-1], counts / bin_s


def plot_throughput(runs: list[Run], labels: list[str], path: Path) -> str:
    fig, (ax,) = _figure()
    end_s = max((np.nanmax(_floats(r.requests["finish_s"])) for r in runs if len(r.requests)), default=1.0)
    bin_s = throughput_bin_s(float(end_s))
    for run, label in zip(runs, labels):
        t_s, rps = finished_per_s(run.requests, bin_s)
        if len(t_s):
            ax.step(t_s, rps, where="post", label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"finished requests/s ({bin_s:g} s bins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def queue_depth(requests: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(time s, requests arrived but not yet ended) after each arrival/finish event."""
    arrival = _floats(requests["arrival_s"])
    finish = _floats(requests["finish_s"])
    finish = finish[~np.isnan(finish)]
    t_s = np.concatenate([arrival, finish])
    delta = np.concatenate([np.ones(len(arrival)), -np.ones(len(finish))])
    order = np.lexsort((delta, t_s))  # at equal times finishes (-1) first: depth never overshoots
    return t_s[order], np.cumsum(delta[order])


def plot_queue_depth(runs: list[Run], labels: list[str], path: Path) -> str:
    fig, (ax,) = _figure()
    for run, label in zip(runs, labels):
        t_s, depth = queue_depth(run.requests)
        if len(t_s):
            ax.step(t_s, depth, where="post", label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests in system")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_split_and_mode(runs: list[Run], labels: list[str], path: Path) -> str:
    """GPU1 attention SMs (0 = not split) and the serving mode, as steps over time."""
    fig, (ax_sms, ax_mode) = _figure(2, 3.0)
    for run, label in zip(runs, labels):
        steps = run.steps.sort_values("t_start_s", kind="stable")
        if len(steps) == 0:
            continue
        t_s = steps["t_start_s"].to_numpy(dtype=float)
        gpu1 = steps[(steps["device"] == "gpu1").fillna(False)]  # the split lives on GPU1 only
        ax_sms.step(gpu1["t_start_s"].to_numpy(dtype=float), _floats(gpu1["attn_sms"]), where="post", label=label)
        mode_index = steps["mode"].map({m: i for i, m in enumerate(MODES)}).astype(float).to_numpy()
        ax_mode.step(t_s, mode_index, where="post", label=label)
    ax_sms.set_ylabel("attention SMs")
    ax_mode.set_yticks(range(len(MODES)), MODES)
    ax_mode.set_ylabel("mode")
    for ax in (ax_sms, ax_mode):
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


STAGE_COLORS = {"prefill": "tab:blue", "decode": "tab:green", "mixed": "tab:olive", "attn": "tab:orange",
                "ffn": "tab:purple", "transfer": "tab:red"}

# attn and ffn run at once on disjoint SM partitions of GPU1: draw them as the lane's two halves.
STAGE_BANDS = {"attn": (0.0, 0.4), "ffn": (-0.4, 0.4)}


def plot_timeline(runs: list[Run], labels: list[str], path: Path, window_s: float) -> str:
    """GPU0 / link / GPU1 busy bars over the first window_s seconds, one panel per run."""
    fig, axes = _figure(len(runs), 2.2)
    for ax, run, label in zip(axes, runs, labels):
        steps = run.steps[run.steps["t_start_s"] < window_s]
        for lane, device in enumerate(LANES):
            rows = steps[(steps["device"] == device).fillna(False)]
            for stage, group in rows.groupby("stage", observed=True):
                start = group["t_start_s"].to_numpy(dtype=float)
                width = np.minimum(group["t_end_s"].to_numpy(dtype=float), window_s) - start
                low, height = STAGE_BANDS.get(str(stage), (-0.4, 0.8))
                ax.broken_barh(list(zip(start, width)), (lane + low, height),
                               color=STAGE_COLORS.get(str(stage), "gray"), label=str(stage))
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right", ncol=len(unique))
        ax.set_yticks(range(len(LANES)), LANES)
        ax.set_xlim(0, window_s)
        ax.set_title(f"{label} (first {window_s:g} s)", fontsize=9)
    axes[-1].set_xlabel("time (s)")
    return _save(fig, path)


# ---------------------------------------------------------------- Perfetto

def chrome_trace(runs: list[Run], labels: list[str]) -> dict:
    """Chrome trace-event JSON: one "X" event per steps row, pid per run, tid per device/stage lane."""
    events = []
    for pid, (run, label) in enumerate(zip(runs, labels), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
        steps = run.steps
        lane_names = (steps["device"].astype(str) + "/" + steps["stage"].astype(str)).to_numpy()
        lanes = sorted(set(lane_names), key=lambda n: (DEVICES.index(n.split("/")[0]) if n.split("/")[0] in DEVICES
                                                       else 99, n))
        tids = {name: i for i, name in enumerate(lanes, start=1)}
        events += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
                   for name, tid in tids.items()]
        start_us = steps["t_start_s"].to_numpy(dtype=float) * 1e6
        dur_us = np.maximum(steps["t_end_s"].to_numpy(dtype=float) * 1e6 - start_us, 0.0)
        cols = {c: steps[c].tolist() for c in ("stage", "batch_size", "tokens", "num_steps", "attn_sms",
                                                "microbatch", "mode")}
        for i, lane in enumerate(lane_names):
            events.append({"ph": "X", "name": cols["stage"][i], "pid": pid, "tid": tids[lane],
                           "ts": float(start_us[i]), "dur": float(dur_us[i]),
                           "args": {k: _plain(cols[k][i]) for k in cols if k != "stage"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _plain(value):
    """JSON-safe scalar (pandas NA -> None, numpy ints -> int)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


# ---------------------------------------------------------------- CLI

def write_report(run_paths: list[str | Path], out_dir: str | Path | None = None, slo: Slo | None = None,
                 timeline_window_s: float = TIMELINE_WINDOW_S) -> Path:
    """Load the runs, write report.md, the PNGs and trace.json into out_dir; returns out_dir."""
    slo = slo or Slo(DEFAULT_SLO_TTFT_MS / 1e3, DEFAULT_SLO_TPOT_MS / 1e3)
    runs = [load_run(p) for p in run_paths]
    out = Path(out_dir) if out_dir is not None else Path(run_paths[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    summaries = [run_summary(r, slo) for r in runs]
    plots = [
        plot_latency_cdfs(runs, labels, out / "latency_cdf.png"),
        plot_throughput(runs, labels, out / "throughput.png"),
        plot_queue_depth(runs, labels, out / "queue_depth.png"),
        plot_split_and_mode(runs, labels, out / "sm_split_mode.png"),
        plot_timeline(runs, labels, out / "timeline.png", timeline_window_s),
    ]
    (out / "report.md").write_text(markdown_report(runs, labels, summaries, plots))
    (out / "trace.json").write_text(json.dumps(chrome_trace(runs, labels)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <first RUN>/report)")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS)
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS)
    p.add_argument("--timeline-s", type=float, default=TIMELINE_WINDOW_S,
                   help="the GPU timeline shows the first this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    try:
        out = write_report(args.runs, args.out, slo, args.timeline_s)
    except TraceSchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/ (report.md, *.png, trace.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
