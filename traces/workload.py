"""Workloads: the request stream both bodies (sim/ and real/) replay.

A workload is a list of `RequestSpec` (arrival time, prompt and output lengths) plus where it came
from and which transforms were applied, so a result can always say what load produced it.
Sources: real traces (Azure LLM inference CSV, Mooncake JSONL, Vidur/Splitwise CSV; the format is
detected from the content, not the file name) or a synthetic generator whose defaults follow the
Azure 2023 conversation trace. Run `python -m traces.workload PATH|synthetic` for a summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass(slots=True)
class RequestSpec:
    """One request to replay: when it arrives and how many tokens go in and come out."""
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


class WorkloadError(ValueError):
    """A workload file cannot be used; the one-line message names the file, line and problem."""


@dataclass(slots=True)
class Workload:
    """Requests in arrival order (first at 0.0 s, ids 0..N-1) and how they were obtained."""
    requests: list[RequestSpec]
    source: str  # file path, or "synthetic"
    format: str  # "azure" | "mooncake" | "vidur" | "synthetic"
    skipped_rows: int = 0  # bad rows skipped by load_workload(skip_bad_rows=True)
    notes: list[str] = field(default_factory=list)  # transforms applied, in order
    dropped_too_long: int = 0  # requests removed by apply_max_context(policy="drop")
    clipped_too_long: int = 0  # requests shortened by apply_max_context(policy="clip")

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate: inter-arrival gaps per second (0 when fewer than two requests)."""
        n, d = len(self.requests), self.duration_s
        return (n - 1) / d if n > 1 and d > 0 else 0.0

    def describe(self) -> str:
        """A few lines a person can read: size, load and length distributions."""
        n = len(self.requests)
        lines = [f"workload: {self.source} ({self.format})"]
        if n == 0:
            lines.append("requests: 0")
        else:
            lines.append(f"requests: {n} over {self.duration_s:.1f} s ({self.duration_s / 60:.1f} min), "
                         f"mean rate {self.rate_rps:.2f} req/s")
            for name, values in (("prompt", [r.prompt_tokens for r in self.requests]),
                                 ("output", [r.output_tokens for r in self.requests])):
                a = np.asarray(values)
                p50, p90, p99 = np.percentile(a, [50, 90, 99])
                lines.append(f"{name} tokens: mean {a.mean():.0f}, p50 {p50:.0f}, p90 {p90:.0f}, "
                             f"p99 {p99:.0f}, max {a.max()}")
        if self.skipped_rows:
            lines.append(f"skipped rows: {self.skipped_rows}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loaders

@dataclass(frozen=True, slots=True)
class _Format:
    name: str
    kind: str  # "csv" | "jsonl"
    time_col: str
    prompt_col: str
    output_col: str
    time_unit: str  # "datetime" | "s" | "ms"

    @property
    def columns(self) -> tuple[str, str, str]:
        return (self.time_col, self.prompt_col, self.output_col)


FORMATS = (
    _Format("azure", "csv", "TIMESTAMP", "ContextTokens", "GeneratedTokens", "datetime"),
    _Format("vidur", "csv", "arrived_at", "num_prefill_tokens", "num_decode_tokens", "s"),
    _Format("mooncake", "jsonl", "timestamp", "input_length", "output_length", "ms"),
)
_KNOWN = "; ".join(f"{f.name} {f.kind.upper()} ({','.join(f.columns)})" for f in FORMATS)


def _short(text: str, limit: int = 80) -> str:
    """repr() keeps a message on one line whatever the file holds."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def load_workload(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> Workload:
    """Load a trace file; the format comes from its header or first JSON object.

    Bad rows raise WorkloadError (naming the 1-based line, header = line 1) unless skip_bad_rows,
    which skips and counts them. Problems with the file as a whole always raise.
    """
    source = str(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise WorkloadError(f"{source}: file not found") from None
    except IsADirectoryError:
        raise WorkloadError(f"{source}: is a directory, not a trace file") from None
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{source}: not UTF-8 text (byte {e.start}); is it a trace file?") from None
    except OSError as e:
        raise WorkloadError(f"{source}: cannot read: {e.strerror or e}") from None

    first = next((ln for ln in text.splitlines() if ln.strip()), None)
    if first is None:
        raise WorkloadError(f"{source}: empty file")
    if first.lstrip().startswith("{"):
        fmt, rows = _read_jsonl(source, text)
    else:
        fmt, rows = _read_csv(source, text)
    return _build(source, fmt, rows, skip_bad_rows)


@dataclass(slots=True)
class _Rows:
    """Raw field values of the rows that had the right shape, plus rows already known bad."""
    line_nos: list[int] = field(default_factory=list)
    times: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, problem)


def _read_csv(source: str, text: str) -> tuple[_Format, _Rows]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(r for r in reader if any(f.strip() for f in r))
        header_line = reader.line_num
        header = [h.strip() for h in header]
        fmt = next((f for f in FORMATS if f.kind == "csv" and set(f.columns) <= set(header)), None)
        if fmt is None:
            near = max((f for f in FORMATS if f.kind == "csv"), key=lambda f: len(set(f.columns) & set(header)))
            missing = [c for c in near.columns if c not in header]
            if len(missing) < len(near.columns):
                raise WorkloadError(f"{source}: line {header_line}: missing column(s) {', '.join(missing)} "
                                    f"for {near.name} format (header {_short(','.join(header))})")
            raise WorkloadError(f"{source}: unknown format (line {header_line} is "
                                f"{_short(','.join(header))}); known formats: {_KNOWN}")
        idx = [header.index(c) for c in fmt.columns]
        rows = _Rows()
        for row in reader:
            if not any(f.strip() for f in row):
                continue  # blank line
            if len(row) != len(header):
                rows.bad.append((reader.line_num, f"has {len(row)} fields, header has {len(header)}"))
                continue
            rows.line_nos.append(reader.line_num)
            rows.times.append(row[idx[0]].strip())
            rows.prompts.append(row[idx[1]].strip())
            rows.outputs.append(row[idx[2]].strip())
    except csv.Error as e:
        raise WorkloadError(f"{source}: line {reader.line_num}: malformed CSV ({e})") from None
    if not rows.line_nos and not rows.bad:
        raise WorkloadError(f"{source}: no requests (only a header on line {header_line})")
    return fmt, rows


def _read_jsonl(source: str, text: str) -> tuple[_Format, _Rows]:
    fmt = next(f for f in FORMATS if f.kind == "jsonl")
    rows = _Rows()
    checked_keys = False
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad.append((line_no, f"invalid JSON ({e.msg}, column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.bad.append((line_no, f"not a JSON object: {_short(line)}"))
            continue
        if not checked_keys:  # the first object plays the role of a CSV header
            missing = [c for c in fmt.columns if c not in obj]
            if missing:
                raise WorkloadError(f"{source}: line {line_no}: missing key(s) {', '.join(missing)} "
                                    f"for mooncake format; known formats: {_KNOWN}")
            checked_keys = True
        missing = [c for c in fmt.columns if c not in obj]
        if missing:
            rows.bad.append((line_no, f"missing key(s) {', '.join(missing)}"))
            continue
        rows.line_nos.append(line_no)
        rows.times.append(obj[fmt.time_col])
        rows.prompts.append(obj[fmt.prompt_col])
        rows.outputs.append(obj[fmt.output_col])
    return fmt, rows


def _to_float(raw: list) -> np.ndarray:
    """Numbers as float64, NaN where a value is not a number (fast path for clean columns)."""
    if not any(isinstance(v, bool) for v in raw):
        try:
            return np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            pass
    out = np.full(len(raw), np.nan)
    for i, v in enumerate(raw):
        if isinstance(v, bool):
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def _times_s(fmt: _Format, raw: list) -> np.ndarray:
    """Arrival times in seconds relative to the first parsable one, NaN where unparsable."""
    if fmt.time_unit == "datetime":
        stamps = pd.to_datetime(pd.Series(raw, dtype=object), format="ISO8601", utc=True, errors="coerce")
        ok = stamps.notna().to_numpy()
        ns = stamps.dt.tz_localize(None).dt.as_unit("ns").to_numpy().view(np.int64)
        out = np.full(len(raw), np.nan)
        if ok.any():  # subtract in int64 so 100 ns stamps keep their precision
            out[ok] = (ns[ok] - ns[ok][0]) / 1e9
        return out
    t = _to_float(raw)
    return t / 1000.0 if fmt.time_unit == "ms" else t


def _check_lengths(name: str, raw: list):
    """Lengths as float, a bad-row mask, and a function wording row i's problem."""
    v = _to_float(raw)
    finite = np.isfinite(v)
    whole = finite & (v == np.floor(np.where(finite, v, 0)))

    def problem(i: int) -> str:
        what = "is not a number" if not finite[i] else "is not a whole number" if not whole[i] else "must be >= 1"
        return f"{name} {_short(raw[i])} {what}"
    return v, ~whole | (v < 1), problem


def _build(source: str, fmt: _Format, rows: _Rows, skip_bad_rows: bool) -> Workload:
    lines = np.asarray(rows.line_nos, dtype=np.int64)
    t = _times_s(fmt, rows.times)
    prompt, prompt_bad, prompt_problem = _check_lengths(fmt.prompt_col, rows.prompts)
    output, output_bad, output_problem = _check_lengths(fmt.output_col, rows.outputs)
    time_bad = ~np.isfinite(t)
    bad = time_bad | prompt_bad | output_bad
    # A good row is "backwards" when it is earlier than some earlier good row; skipping such rows
    # leaves the running maximum unchanged, so one pass over the good rows finds them all.
    good = np.flatnonzero(~bad)
    tg = t[good]
    backwards = np.zeros(len(t), dtype=bool)
    if len(tg) > 1:
        backwards[good[1:]] = tg[1:] < np.maximum.accumulate(tg)[:-1]
    bad |= backwards

    def problem(i: int) -> str:
        if time_bad[i]:
            what = "cannot be parsed as a date-time" if fmt.time_unit == "datetime" else "is not a number"
            return f"{fmt.time_col} {_short(rows.times[i])} {what}"
        if prompt_bad[i]:
            return prompt_problem(i)
        if output_bad[i]:
            return output_problem(i)
        prev = good[good < i][np.argmax(t[good[good < i]])]
        return (f"{fmt.time_col} goes backwards: {_short(rows.times[i])} is earlier than "
                f"{_short(rows.times[prev])} on line {lines[prev]}")

    first_bad = [(int(lines[i]), problem(int(i))) for i in np.flatnonzero(bad)[:1]]
    all_bad = sorted(rows.bad + first_bad)
    n_bad = len(rows.bad) + int(bad.sum())
    if all_bad and not skip_bad_rows:
        line_no, msg = all_bad[0]
        raise WorkloadError(f"{source}: line {line_no}: {msg}")
    keep = np.flatnonzero(~bad)
    if len(keep) == 0:
        raise WorkloadError(f"{source}: no valid requests ({n_bad} bad rows; first: line {all_bad[0][0]}: "
                            f"{all_bad[0][1]})")
    arrival = t[keep] - t[keep[0]]
    requests = [RequestSpec(i, a, p, o) for i, (a, p, o) in enumerate(zip(
        arrival.tolist(), prompt[keep].astype(np.int64).tolist(), output[keep].astype(np.int64).tolist()))]
    notes = [f"loaded {fmt.name} trace; arrivals re-based so the first request (line {lines[keep[0]]}, "
             f"{fmt.time_col} {_short(rows.times[keep[0]])}) is at 0.0 s"]
    if n_bad:
        notes.append(f"skipped {n_bad} bad rows (first: line {all_bad[0][0]}: {all_bad[0][1]})")
    return Workload(requests, source, fmt.name, skipped_rows=n_bad, notes=notes)


# ---------------------------------------------------------------------------------------------
# Synthetic workloads

# Azure LLM inference trace 2023, conversation (../shared/traces/README.md).
AZURE_CONV_RATE_RPS = 5.53
AZURE_CONV_INTERARRIVAL_CV = 1.09
AZURE_CONV_PROMPT = dict(mean=1155, p50=1020, max=14050)
AZURE_CONV_OUTPUT = dict(mean=211, p50=129, max=1000)


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _lognormal_sigma(mean: float, median: float, max_tokens: float) -> float:
    """Sigma of a lognormal with the given median whose mean AFTER clipping at max_tokens is `mean`.

    The plain fit (sigma^2 = 2 ln(mean/median)) lands ~5% low for Azure outputs, whose long tail
    is cut at 1000 tokens; the clipped mean rises with sigma, so bisect on it.
    """
    if not 0 < median < mean < max_tokens:
        raise ValueError(f"need 0 < median ({median}) < mean ({mean}) < max ({max_tokens})")
    mu, log_max = math.log(median), math.log(max_tokens)

    def clipped_mean(s: float) -> float:
        return (math.exp(mu + s * s / 2) * _norm_cdf((log_max - mu - s * s) / s)
                + max_tokens * (1 - _norm_cdf((log_max - mu) / s)))

    lo, hi = 1e-6, math.sqrt(2 * math.log(mean / median))
    while clipped_mean(hi) < mean:
        if hi > 50:
            raise ValueError(f"no lognormal with median {median} reaches mean {mean} below {max_tokens}")
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_mean(mid) < mean else (lo, mid)
    return (lo + hi) / 2


def _lognormal_lengths(rng: np.random.Generator, n: int, stats: dict) -> np.ndarray:
    sigma = _lognormal_sigma(stats["mean"], stats["p50"], stats["max"])
    x = rng.lognormal(math.log(stats["p50"]), sigma, n)
    return np.clip(np.rint(x), 1, stats["max"]).astype(np.int64)


def _as_lengths(name: str, values: Sequence[int] | None) -> np.ndarray:
    if values is None or len(values) == 0:
        raise ValueError(f'lengths="empirical" needs a non-empty {name}')
    a = np.asarray(values)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (a < 1).any():
        raise ValueError(f"{name} must be a flat list of integers >= 1")
    return a.astype(np.int64)


def synthetic_workload(num_requests: int = 1000, *, rate_rps: float = AZURE_CONV_RATE_RPS,
                       arrival: str = "gamma", cv: float = AZURE_CONV_INTERARRIVAL_CV,
                       lengths: str = "lognormal", seed: int = 0,
                       prompt_stats: dict | None = None, output_stats: dict | None = None,
                       prompt_lengths: Sequence[int] | None = None,
                       output_lengths: Sequence[int] | None = None) -> Workload:
    """A reproducible request stream whose defaults follow the Azure 2023 conversation trace.

    arrival: "poisson" (exponential gaps; cv ignored) or "gamma" (gaps with coefficient of
    variation cv: >1 burstier than Poisson). lengths: "lognormal" (median and clipped mean match
    prompt_stats/output_stats = dict(mean, p50, max), default Azure conv) or "empirical" (drawn
    from prompt_lengths/output_lengths, e.g. from a loaded trace; equal-sized lists are drawn as
    pairs so a trace's prompt/output correlation survives).
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    rng = np.random.default_rng(seed)
    mean_gap_s = 1.0 / rate_rps
    if arrival == "poisson":
        gaps = rng.exponential(mean_gap_s, num_requests - 1)
        arrival_desc = f"poisson arrivals at {rate_rps:g} req/s"
    elif arrival == "gamma":
        if not cv > 0:
            raise ValueError(f"cv must be > 0, got {cv}")
        shape = 1.0 / cv ** 2
        gaps = rng.gamma(shape, mean_gap_s / shape, num_requests - 1)
        arrival_desc = f"gamma arrivals at {rate_rps:g} req/s (cv {cv:g})"
    else:
        raise ValueError(f'arrival must be "poisson" or "gamma", got {arrival!r}')
    arrival_s = np.concatenate(([0.0], np.cumsum(gaps)))

    if lengths == "lognormal":
        pstats, ostats = prompt_stats or AZURE_CONV_PROMPT, output_stats or AZURE_CONV_OUTPUT
        prompt = _lognormal_lengths(rng, num_requests, pstats)
        output = _lognormal_lengths(rng, num_requests, ostats)
        length_desc = (f"lognormal lengths (prompt median {pstats['p50']} mean {pstats['mean']} "
                       f"max {pstats['max']}; output median {ostats['p50']} mean {ostats['mean']} "
                       f"max {ostats['max']})")
    elif lengths == "empirical":
        p_pool = _as_lengths("prompt_lengths", prompt_lengths)
        o_pool = _as_lengths("output_lengths", output_lengths)
        if len(p_pool) == len(o_pool):
            idx = rng.integers(0, len(p_pool), num_requests)
            prompt, output = p_pool[idx], o_pool[idx]
        else:
            prompt = p_pool[rng.integers(0, len(p_pool), num_requests)]
            output = o_pool[rng.integers(0, len(o_pool), num_requests)]
        length_desc = f"empirical lengths ({len(p_pool)} prompts, {len(o_pool)} outputs)"
    else:
        raise ValueError(f'lengths must be "lognormal" or "empirical", got {lengths!r}')

    requests = [RequestSpec(i, a, p, o) for i, (a, p, o) in
                enumerate(zip(arrival_s.tolist(), prompt.tolist(), output.tolist()))]
    return Workload(requests, "synthetic", "synthetic",
                    notes=[f"synthetic: {num_requests} requests, {arrival_desc}, {length_desc}, seed {seed}"])


# ---------------------------------------------------------------------------------------------
# Transforms: each returns a new Workload (the input is left untouched) and records a note.

def _renumbered(requests: list[RequestSpec], shift_s: float = 0.0, divide_by: float = 1.0) -> list[RequestSpec]:
    return [RequestSpec(i, (r.arrival_s - shift_s) / divide_by, r.prompt_tokens, r.output_tokens)
            for i, r in enumerate(requests)]


def _with(w: Workload, requests: list[RequestSpec], note: str, **changes) -> Workload:
    return replace(w, requests=requests, notes=[*w.notes, note], **changes)


def scale_rate(w: Workload, factor: float) -> Workload:
    """Multiply the arrival rate by factor (divide arrival times); how load sweeps are made."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"rate factor must be > 0, got {factor}")
    return _with(w, _renumbered(w.requests, divide_by=factor), f"arrival rate scaled x{factor:g}")


def time_window(w: Workload, start_s: float, end_s: float) -> Workload:
    """Keep requests arriving in [start_s, end_s), re-based so the first kept one is at 0.0 s."""
    if not end_s > start_s:
        raise ValueError(f"time window needs end_s > start_s, got [{start_s}, {end_s})")
    kept = [r for r in w.requests if start_s <= r.arrival_s < end_s]
    shift_s = kept[0].arrival_s if kept else 0.0
    return _with(w, _renumbered(kept, shift_s=shift_s),
                 f"time window [{start_s:g}, {end_s:g}) s: kept {len(kept)} of {len(w.requests)} requests")


def first_n(w: Workload, n: int) -> Workload:
    """Keep the first n requests in arrival order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kept = w.requests[:n]
    return _with(w, _renumbered(kept), f"kept first {len(kept)} of {len(w.requests)} requests")


def apply_max_context(w: Workload, max_context_tokens: int, policy: str = "drop") -> Workload:
    """Make every request fit a model context of max_context_tokens (prompt + output).

    "drop" removes requests that do not fit; "clip" shortens the prompt first (keeping >= 1 token)
    and the output only if it alone does not fit. Counts go to dropped_too_long/clipped_too_long.
    """
    if max_context_tokens < 2:
        raise ValueError(f"max_context_tokens must be >= 2 (one prompt + one output token), got {max_context_tokens}")
    if policy not in ("drop", "clip"):
        raise ValueError(f'policy must be "drop" or "clip", got {policy!r}')
    limit = max_context_tokens
    too_long = [r for r in w.requests if r.prompt_tokens + r.output_tokens > limit]
    if policy == "drop":
        kept = [r for r in w.requests if r.prompt_tokens + r.output_tokens <= limit]
        note = f"dropped {len(too_long)} of {len(w.requests)} requests with prompt+output > {limit} tokens"
        return _with(w, _renumbered(kept), note, dropped_too_long=w.dropped_too_long + len(too_long))
    clipped, outputs_clipped = [], 0
    for r in w.requests:
        prompt, output = r.prompt_tokens, r.output_tokens
        if prompt + output > limit:
            if output > limit - 1:
                output, outputs_clipped = limit - 1, outputs_clipped + 1
            prompt = limit - output
        clipped.append(RequestSpec(r.request_id, r.arrival_s, prompt, output))
    note = (f"clipped {len(too_long)} of {len(w.requests)} requests to prompt+output <= {limit} tokens "
            f"({outputs_clipped} outputs shortened too)")
    return _with(w, clipped, note, clipped_too_long=w.clipped_too_long + len(too_long))


def make_workload(spec: str | os.PathLike, *, num_requests: int | None = None, rate_scale: float = 1.0, seed: int = 0,
                  skip_bad_rows: bool = False, max_context_tokens: int | None = None,
                  context_policy: str = "drop") -> Workload:
    """What the CLIs call: "synthetic" or a trace path, then max-context, first N, rate scale.

    Max-context runs before first N so that --num-requests N yields N requests even when the
    "drop" policy removes some. For "synthetic", num_requests is the count (default 1000).
    """
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if str(spec).strip().lower() == "synthetic":
        w = synthetic_workload(num_requests or 1000, seed=seed)
    else:
        w = load_workload(spec, skip_bad_rows=skip_bad_rows)
    if max_context_tokens is not None:
        w = apply_max_context(w, max_context_tokens, context_policy)
    if num_requests is not None and num_requests < len(w.requests):
        w = first_n(w, num_requests)
    if rate_scale != 1.0:
        w = scale_rate(w, rate_scale)
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m traces.workload",
        description="Load a request trace (Azure CSV, Mooncake JSONL, Vidur CSV; format detected from "
                    "the content) or make a synthetic one, and print a summary.")
    parser.add_argument("spec", metavar="PATH|synthetic",
                        help='trace file, or "synthetic" for a generated Azure-conv-like workload')
    parser.add_argument("--num-requests", type=int, default=None, metavar="N",
                        help="keep the first N requests (synthetic: generate N; default 1000)")
    parser.add_argument("--rate-scale", type=float, default=1.0, metavar="X",
                        help="multiply the arrival rate by X (default 1.0)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip and count malformed rows instead of stopping at the first one")
    parser.add_argument("--max-context-tokens", type=int, default=None, metavar="T",
                        help="make every request fit prompt+output <= T tokens")
    parser.add_argument("--context-policy", choices=("drop", "clip"), default="drop",
                        help="what to do with requests over --max-context-tokens (default drop)")
    parser.add_argument("--seed", type=int, default=0, help="seed for synthetic workloads (default 0)")
    syn = parser.add_argument_group("synthetic workloads (defaults follow the Azure 2023 conversation trace)")
    syn.add_argument("--rate-rps", type=float, default=AZURE_CONV_RATE_RPS, metavar="R",
                     help=f"mean arrival rate before --rate-scale (default {AZURE_CONV_RATE_RPS})")
    syn.add_argument("--arrival", choices=("gamma", "poisson"), default="gamma",
                     help="inter-arrival gaps: gamma with --cv, or poisson (default gamma)")
    syn.add_argument("--cv", type=float, default=AZURE_CONV_INTERARRIVAL_CV,
                     help=f"gamma gaps' coefficient of variation, > 1 is burstier than Poisson "
                          f"(default {AZURE_CONV_INTERARRIVAL_CV})")
    for name, stats in (("prompt", AZURE_CONV_PROMPT), ("output", AZURE_CONV_OUTPUT)):
        syn.add_argument(f"--{name}-tokens", type=int, nargs=3, default=None, metavar=("MEDIAN", "MEAN", "MAX"),
                         help=f"lognormal {name} lengths (default {stats['p50']} {stats['mean']} {stats['max']})")
    parser.add_argument("--write", metavar="CSV", default=None,
                        help="also write the workload as a trace file (Vidur CSV: arrived_at in seconds, "
                             "num_prefill_tokens, num_decode_tokens) that sim.run and real.run read as "
                             "--workload, so both replay exactly the same requests")
    args = parser.parse_args(argv)
    synthetic = args.spec.strip().lower() == "synthetic"
    knobs = [flag for flag, value, default in (
        ("--rate-rps", args.rate_rps, AZURE_CONV_RATE_RPS), ("--arrival", args.arrival, "gamma"),
        ("--cv", args.cv, AZURE_CONV_INTERARRIVAL_CV), ("--prompt-tokens", args.prompt_tokens, None),
        ("--output-tokens", args.output_tokens, None)) if value != default]
    if knobs and not synthetic:
        print(f"error: {', '.join(knobs)} shape a synthetic workload; {args.spec} is a trace file "
              f"(use --rate-scale to change its load)", file=sys.stderr)
        return 2
    try:
        if synthetic:
            stats = {}
            for name in ("prompt", "output"):
                given = getattr(args, f"{name}_tokens")
                if given is not None:
                    median, mean, top = given
                    if not 1 <= median < mean < top:
                        raise ValueError(f"--{name}-tokens needs 1 <= MEDIAN < MEAN < MAX, got {given}")
                    stats[f"{name}_stats"] = dict(p50=median, mean=mean, max=top)
            w = synthetic_workload(args.num_requests or 1000, rate_rps=args.rate_rps, arrival=args.arrival,
                                   cv=args.cv, seed=args.seed, **stats)
            if args.max_context_tokens is not None:
                w = apply_max_context(w, args.max_context_tokens, args.context_policy)
            if args.rate_scale != 1.0:
                w = scale_rate(w, args.rate_scale)
        else:
            w = make_workload(args.spec, num_requests=args.num_requests, rate_scale=args.rate_scale,
                              seed=args.seed, skip_bad_rows=args.skip_bad_rows,
                              max_context_tokens=args.max_context_tokens, context_policy=args.context_policy)
    except ValueError as e:  # WorkloadError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(w.describe())
    if args.write:
        try:
            write_vidur_csv(w, args.write)
        except OSError as e:
            print(f"error: {args.write}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {len(w.requests)} requests -> {args.write}")
    return 0


def write_vidur_csv(w: Workload, path: str | os.PathLike) -> None:
    """Write a workload as a Vidur-format CSV (arrival seconds at full float precision), which load_workload
    reads back to the same requests: how a synthetic workload is frozen for a sim-vs-real comparison."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(("arrived_at", "num_prefill_tokens", "num_decode_tokens"))
        for r in w.requests:
            out.writerow((repr(float(r.arrival_s)), r.prompt_tokens, r.output_tokens))


if __name__ == "__main__":
    sys.exit(main())
