"""Why the simulator misses the real runs, mechanism by mechanism (issue 6):

    python bench/fidelity_diagnose.py bench/results/fidelity_runs_NVIDIA_H200_x10_copy.tar.xz \
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv [--json OUT]

For each real run in the .tgz (written by `bench/fidelity_bench.py real`), simulated as fidelity_bench does:
  1. load: arrivals vs requests served, decode batch and output tok/s over time, real and sim;
  2. step times by stage and size: real, the isolated profile at the same shape, the sim; prefill steps by
     tokens against the model at the same prompts (isolated step + engine overhead), with its error;
  3. the gaps between consecutive steps on each GPU (host time no step row covers);
  4. the overhead of the real engine's steps over the isolated profile (real step + the gap before the
     next launch - the profile at the same shape), by GPU0/GPU1 state, written as the engine_* rows
     `python -m real.profile` now measures, and the sim re-run with them one mechanism at a time.
  5. the spread of those steps (p10/p50/p90/p99 of each step's period over its expected period: the
     isolated step at its shape + its bucket's mean overhead), written as the engine_* rows' spread
     columns, and the sim re-run with the overhead by state as in 4 and each step drawn from that spread
     (sim/variability.py) over --seeds seeds (the errors are their mean; p99s move from seed to seed): on
     decode steps, on decode and prefill steps, with runs merged as usual and step by step, and with the
     spread taken around each bucket's mean instead of each shape's (the cost model's error from shape
     to shape then counts as noise).
     It also prints how far a decode step's ratio carries to the next steps (autocorrelation), which
     the independent draws leave out.
The rows of 4 and 5 come from the very runs being predicted: the errors with them are IN-SAMPLE, an
attribution of the error to mechanisms and a check that the sim turns step-time overheads and their
spread into the right TPOT and TTFT, not a fidelity claim. Each policy's rows are also applied to the other
policy's run (same trace, another run). A profile with measured engine_* rows replaces them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH_BINS = [1, 2, 4, 8, 16, 32, 64, 128, 192, 224, 257]  # [lo, hi) decode batch buckets
QUEUED_GAP_S = 1e-3  # a longer gap before the next step means the GPU waited for work, not for the host
KEYS = ("throughput_rps", "ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms")
SPREAD = ("p10_over_mean", "p50_over_mean", "p90_over_mean", "p99_over_mean")


def _on(starts: np.ndarray, ends: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Is a step of (sorted, non-overlapping) [starts, ends) running at each time t?"""
    if not len(starts):
        return np.zeros(len(t), dtype=bool)
    i = np.searchsorted(starts, t, side="right") - 1
    return (i >= 0) & (t < ends[np.clip(i, 0, None)])


def _gap_after(t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    gap = np.append(t0[1:] - t1[:-1], np.inf)
    return np.where(gap < QUEUED_GAP_S, gap, 0.0)


def longest_contexts(reqs: pd.DataFrame, times: np.ndarray, device: str = "gpu1") -> np.ndarray:
    """The longest context among the requests decoding on `device` at each time (0 where none): a request
    decodes from its KV's arrival (or first token) to its end, its context growing evenly from prompt + 1
    to prompt + its generated tokens (requests.csv has no per-step contexts; decoding_contexts)."""
    return np.array([c.max() if len(c) else 0.0 for c in decoding_contexts(reqs, times, device)])


def _gpu1_decode_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """GPU1's decode steps, one row each: "decode" rows (sequential, or a pipelined step in one CUDA graph
    as the real engine writes it) and the "attn" row of a step written as attention + FFN stage rows (the
    simulator's pipelined steps, a profiled real pipeline's): it spans the whole step, its "ffn" twin too."""
    return steps[(steps.device == "gpu1") & steps.stage.isin(["decode", "attn"])]


def _has_gpu1_decode(run: Path) -> bool:
    return not _gpu1_decode_rows(pd.read_csv(run / "steps.csv", usecols=["device", "stage"])).empty


def step_tables(run: Path, cost) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(decode steps on GPU1, prefill steps on GPU0) of a run with the modelled cost at their shapes: the
    isolated step plus, for decode steps, the decode tail of the batch's longest context as the simulator
    adds it (sim/calibrated.py decode_tail_s times its measured scale, decode_tail_scale; column `tail`)."""
    steps = pd.read_csv(run / "steps.csv")
    reqs = pd.read_csv(run / "requests.csv")
    g0 = steps[steps.device == "gpu0"].sort_values("t_start_s")
    g1 = _gpu1_decode_rows(steps).sort_values("t_start_s")
    s0, e0 = g0.t_start_s.to_numpy(), g0.t_end_s.to_numpy()
    s1, e1 = g1.t_start_s.to_numpy(), g1.t_end_s.to_numpy()
    n = g1.num_steps.to_numpy()
    lk = steps[steps.device == "link"]
    ls_, le_ = lk.t_start_s.to_numpy(), lk.t_end_s.to_numpy()
    dec = pd.DataFrame(dict(t0=s1, b=g1.batch_size.to_numpy(), kv=g1.kv_tokens.to_numpy(),
                            split=g1.attn_sms.to_numpy() > 0, dur=(e1 - s1) / n, gap=_gap_after(s1, e1),
                            busy=_on(s0, e0, s1),
                            transfer=np.array([((ls_ < e) & (le_ > b)).any() for b, e in zip(s1, e1)], dtype=bool)))
    dec["ctx"] = dec.kv / dec.b
    dec["longest"] = longest_contexts(reqs, s1)
    dec["tail"] = [cost.decode_tail_s(int(b), int(kv), int(m))
                   * cost.decode_tail_scale(int(b), m - kv / b, (int(a), int(f)) if a else None)
                   for b, kv, m, a, f in zip(g1.batch_size, g1.kv_tokens, dec["longest"], g1.attn_sms, g1.ffn_sms)]
    dec["iso"] = [cost.decode_step(int(b), int(kv), (int(a), int(f)) if a else None, 2 if a else 1).step_s
                  for b, kv, a, f in zip(g1.batch_size, g1.kv_tokens, g1.attn_sms, g1.ffn_sms)] + dec["tail"]
    pre = g0[g0.stage == "prefill"]
    lens = reqs.groupby(reqs.prefill_start_s.round(9)).prompt_tokens.apply(list)
    chunks = [[(int(x), 0) for x in lens.get(round(t, 9), [])] or [(int(tok), 0)]
              for t, tok in zip(pre.t_start_s, pre.tokens)]
    p0, p1 = pre.t_start_s.to_numpy(), pre.t_end_s.to_numpy()
    nxt = np.searchsorted(s0, p1, side="left")
    gap = np.where(nxt < len(s0), s0[np.clip(nxt, 0, len(s0) - 1)] - p1, np.inf)
    pf = pd.DataFrame(dict(t0=p0, seqs=pre.batch_size.to_numpy(), tokens=pre.tokens.to_numpy(), dur=p1 - p0,
                           gap=np.where(gap < QUEUED_GAP_S, gap, 0.0), busy=_on(s1, e1, p0)))
    pf["iso"] = [cost.forward_s(c) for c in chunks]
    return dec, pf


PREFILL_TOKEN_EDGES = (0, 1024, 2048, 4096, 4200, 8192, 16384)  # 4,097-4,200: just over a graph bucket


def prefill_by_tokens(pre: pd.DataFrame, cost) -> tuple[pd.DataFrame, dict]:
    """GPU0 prefill steps by sequences and tokens: real against the model at the same prompts (the isolated
    step plus the engine overhead of its shape and GPU1's state, as the simulator charges it; no queueing,
    so this isolates the step cost), and the median / total relative error over all the run's prefills."""
    model = pre.iso + np.array([cost.engine_overhead_s("prefill", int(n), int(t), bool(b))
                                for n, t, b in zip(pre.seqs, pre.tokens, pre.busy)])
    d = pd.DataFrame(dict(seqs=np.minimum(pre.seqs, 3), tokens=pd.cut(pre.tokens, PREFILL_TOKEN_EDGES),
                          real=pre.dur * 1e3, model=model * 1e3))
    table = d.groupby(["seqs", "tokens"], observed=True).agg(steps=("real", "size"), real=("real", "median"),
                                                             model=("model", "median")).round(2)
    err = model / pre.dur - 1
    return table, dict(median_abs_rel_err=float(err.abs().median()), total_rel_err=float(model.sum() / pre.dur.sum() - 1))


IDLE_BEFORE_EDGES_MS = (-1.0, 0.3, 1.0, 5.0, float("inf"))  # GPU0 idle before a prefill launched, ms
IDLE_BEFORE_LABELS = ("back-to-back (< 0.3 ms)", "0.3-1 ms", "1-5 ms", "> 5 ms")


def prefill_extra_by_idle_before(steps: pd.DataFrame, pre: pd.DataFrame, cost) -> pd.DataFrame:
    """GPU0's 1-sequence prefills by how long GPU0 sat idle before each launched and by GPU1's state: the real
    step over the isolated one (extra, ms) against the engine overhead the sim adds (model, ms). Why: the
    profile times engine_prefill_busy on fillers prefilled back to back beside a decode batch, and serving's
    prefills mostly land on an idle GPU0 (2x H200, session 15, GPU1 busy, ~1k-token prompts, nine runs: 0.10-0.42
    ms over the isolated step after 1+ ms idle, 0.44-0.74 back to back; the busy rows charge 0.86 to all; session 16,
    another machine: 0.30-0.42 and 0.62-0.70, the rows 0.59), so the overhead depends on GPU0's own backlog, which
    the rows do not measure (fillers after a 2 ms pause, `prefill_busy_after_idle` in a profile's metadata, took
    what back-to-back ones took: a pause alone does not reproduce it). `steps`: the run's steps.csv."""
    ends = np.sort(steps[steps.device == "gpu0"].t_end_s.to_numpy())
    t0 = pre.t0.to_numpy()
    before = np.searchsorted(ends, t0, side="right")
    prev_end = np.where(before > 0, ends[np.clip(before - 1, 0, max(len(ends) - 1, 0))], -np.inf)
    d = pd.DataFrame(dict(
        idle_before=pd.cut((t0 - prev_end) * 1e3, IDLE_BEFORE_EDGES_MS, labels=IDLE_BEFORE_LABELS),
        gpu1=np.where(pre.busy, "GPU1 busy", "GPU1 idle"), tokens=pre.tokens.to_numpy(),
        extra=(pre.dur - pre.iso).to_numpy() * 1e3,
        model=[cost.engine_overhead_s("prefill", int(n), int(t), bool(b)) * 1e3
               for n, t, b in zip(pre.seqs, pre.tokens, pre.busy)]))[pre.seqs.to_numpy() == 1]
    return d.groupby(["idle_before", "gpu1"], observed=True).agg(
        steps=("extra", "size"), tokens=("tokens", "median"), extra=("extra", "median"),
        model=("model", "median")).round(3)


def spread(period: pd.Series, expected: pd.Series) -> dict:
    """The spread columns of a bucket: percentiles of each step's period over its expected period."""
    return dict(zip(SPREAD, np.percentile(period / expected, [10, 50, 90, 99])))


def expected_period(period: pd.Series, iso: pd.Series, shape: pd.Series | None) -> pd.Series:
    """Each step's expected period: its isolated step + the mean overhead of the steps of its `shape` (a
    finer bin than the row's bucket; the bucket's mean for shapes with fewer than 5 steps, or shape None).
    real.profile measures a spread at one fixed shape: around its shape's mean, the cost model's error
    from shape to shape within a bucket is not counted as step-to-step noise."""
    ovh = period - iso
    if shape is None:
        return iso + ovh.mean()
    by_shape = ovh.groupby(shape)
    mean = by_shape.transform("mean").where(by_shape.transform("size") >= 5, ovh.mean())
    return iso + mean


def engine_rows(dec: pd.DataFrame, pre: pd.DataFrame, cost, by_state: bool = True, gaps: bool = True,
                around: str = "shape") -> list[dict]:
    """What real.profile's engine_* rows would read if the engine behaved as in this run: per bucket (and
    other-GPU state, or pooled), the isolated step at the bucket's median shape + the MEAN overhead of its
    steps (the mean, as real.profile's engine rows: the slow steps count toward throughput), and the spread
    columns (drop them with `without_spread`): each step's period over its expected period, `around` its
    shape's mean (decode: quarter-octave batch x octave context; prefill: sequences x half-octave tokens)
    or its whole "bucket"'s. `gaps`: the overhead includes the gap before the next launch."""
    rows = []
    d = dec[~dec.split]
    for busy in ((False, True) if by_state else (None,)):
        op = "engine_decode_busy" if busy else "engine_decode"
        for lo, hi in zip(BATCH_BINS, BATCH_BINS[1:]):
            g = d[((d.busy == busy) if busy is not None else True) & (d.b >= lo) & (d.b < hi)]
            if len(g) < 5:
                continue
            b, ctx = int(g.b.median()), int(g.ctx.median())
            period = g.dur + (g.gap if gaps else 0.0)
            ovh = float((period - g.iso).mean())
            shape = (np.floor(4 * np.log2(g.b)) * 100 + np.floor(np.log2(g.ctx.clip(lower=1)))) \
                if around == "shape" else None
            rows.append(dict(op=op, batch=b, context=ctx, seconds=max(1e-6, cost.decode_step(b, b * ctx).step_s + ovh),
                             **spread(period, expected_period(period, g.iso, shape))))
    for busy in ((False, True) if by_state else (None,)):
        op = "engine_prefill_busy" if busy else "engine_prefill"
        g = pre[pre.busy == busy] if busy is not None else pre
        for seqs in sorted(set(np.minimum(g.seqs, 8))):
            h = g[np.minimum(g.seqs, 8) == seqs]
            if len(h) < 3:
                continue
            n, t = int(h.seqs.median()), int(h.tokens.median())
            even = [(t // n + (1 if j < t % n else 0), 0) for j in range(n)]
            period = h.dur + (h.gap if gaps else 0.0)
            ovh = float((period - h.iso).mean())
            shape = h.seqs * 100 + np.floor(2 * np.log2(h.tokens)) if around == "shape" else None
            rows.append(dict(op=op, batch=n, tokens=max(t, n), seconds=max(1e-6, cost.forward_s(even) + ovh),
                             **spread(period, expected_period(period, h.iso, shape))))
    return rows


def by_transfer_overlap(dec: pd.DataFrame) -> pd.DataFrame:
    """Unsplit decode steps at batch >= 32 by GPU0's state and whether a KV copy into GPU1 overlapped them:
    real step over the modelled one (isolated profile + decode tail; medians). With the pull transport the
    copy is a kernel on GPU1 beside the decode (real/transfer.py), a contention the profile's engine rows
    (GPU0 fillers that never move to GPU1) do not hold."""
    d = dec[~dec.split & (dec.b >= 32)]
    d = d.assign(gpu0=np.where(d.busy, "busy", "idle"), copy=np.where(d.transfer, "copy", "no copy"),
                 ratio=d.dur / d.iso, real_ms=d.dur * 1e3)
    g = d.groupby(["gpu0", "copy"])
    return pd.DataFrame({"steps": g.size(), "real_over_model": g.ratio.median(), "real_ms": g.real_ms.median()}).round(3)


def by_longest_context(dec: pd.DataFrame, split: bool = False) -> pd.DataFrame:
    """Decode steps at batch >= 32, unsplit (or split: pipelined), by the batch's longest context: real
    step over the isolated profile (without the tail), and the real and modelled (one kernel's) extra
    time (ms, medians): the decode tail's evidence."""
    d = dec[(dec.split == split) & (dec.b >= 32)]
    plain = d.iso - d["tail"]
    bins = pd.cut(d.longest, [0, 2000, 4000, 6000, 9000, 1e9])
    return pd.DataFrame({"steps": d.groupby(bins, observed=True).size(),
                         "real_over_profile": (d.dur / plain).groupby(bins, observed=True).median(),
                         "real_extra_ms": ((d.dur - plain) * 1e3).groupby(bins, observed=True).median(),
                         "tail_ms": (d["tail"] * 1e3).groupby(bins, observed=True).median()}).round(3)


def step_correlation(dec: pd.DataFrame, tail: bool = True) -> dict:
    """How far a decode step's ratio to its expected period (as engine_rows' spread) carries to the next
    steps: autocorrelation at lags 1, 4, 8, and the spread of 4- and 32-step means over what independent
    steps would give (a merged run's sample and the rebalancer's averages see those means). tail=False:
    expected without the decode tail (a long context stays in the batch for many steps)."""
    d = dec[~dec.split]
    period = d.dur + d.gap
    shape = np.floor(4 * np.log2(d.b)) * 100 + np.floor(np.log2(d.ctx.clip(lower=1))) + d.busy * 10_000
    iso = d.iso if tail else d.iso - d["tail"]
    x = (period / expected_period(period, iso, shape)).to_numpy() - 1.0
    out = {f"lag{k}_autocorrelation": float(np.corrcoef(x[:-k], x[k:])[0, 1]) for k in (1, 4, 8)}
    for w in (4, 32):
        means = x[: len(x) // w * w].reshape(-1, w).mean(axis=1)
        out[f"std_of_{w}_step_means_over_independent"] = float(means.std() / (x.std() / np.sqrt(w)))
    return out


def without_spread(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in SPREAD} for r in rows]


def _seed_range(errors: list[float]) -> str:
    e = np.array(errors)
    return f"{e.min():+.2f} / {np.median(e):+.2f} / {e.max():+.2f}, {int((np.abs(e) <= 0.08).sum())}/{len(e)}"


def by_bucket(dec: pd.DataFrame, sim_dec: pd.DataFrame, split: bool = False) -> pd.DataFrame:
    """Decode step time (ms, median) per batch bucket: real by GPU0 state, isolated profile + decode tail
    (and the tail alone), sim; sequential steps, or (split) pipelined ones."""
    out = []
    dec, sim_dec = dec[dec.split == split], sim_dec[sim_dec.split == split]
    for lo, hi in zip(BATCH_BINS, BATCH_BINS[1:]):
        r, s = dec[(dec.b >= lo) & (dec.b < hi)], sim_dec[(sim_dec.b >= lo) & (sim_dec.b < hi)]
        if not len(r):
            continue
        row = dict(batch=f"{lo}-{hi - 1}", steps=len(r), ctx=int(r.ctx.median()),
                   real_gpu0_idle=r[~r.busy].dur.median() * 1e3, real_gpu0_busy=r[r.busy].dur.median() * 1e3,
                   profile=r.iso.median() * 1e3, tail=r["tail"].median() * 1e3, gap=r.gap.median() * 1e3,
                   sim=s.dur.median() * 1e3 if len(s) else np.nan,
                   sim_steps=int(s.b.size))
        out.append(row)
    return pd.DataFrame(out).round(3)


CHUNK_BINS = [0, 512, 1024, 1536, 2048, 4096, 1 << 20]  # (lo, hi] prefill tokens of a mixed step
MIXED_DECODE_BINS = [0, 4, 16, 64, 256, 1 << 20]  # (lo, hi] decode sequences of a mixed step


def colocated_steps(real_steps: pd.DataFrame, sim_steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """single (prefill and decode on GPU0): per stage, the steps and their total and median time, real and sim
    (a sim row may merge decode steps: per step = its time / num_steps); and the mixed steps (a prefill chunk
    with the running decodes) by chunk tokens and decode sequences (one chunk assumed: the prefill tokens are
    the step's tokens less its sequences but one), medians real and sim with their KV tokens."""
    def per_step(steps):
        d = steps[steps.device == "gpu0"].copy()
        d["dur"] = d.t_end_s - d.t_start_s
        d["per"] = d.dur / d.num_steps.clip(lower=1)
        return d

    r, s = per_step(real_steps), per_step(sim_steps)
    stages = []
    for stage in sorted(set(r.stage) | set(s.stage)):
        a, b = r[r.stage == stage], s[s.stage == stage]
        stages.append(dict(stage=stage, real_steps=int(a.num_steps.sum()), sim_steps=int(b.num_steps.sum()),
                           real_total_s=a.dur.sum(), sim_total_s=b.dur.sum(),
                           real_ms=a.per.median() * 1e3, sim_ms=b.per.median() * 1e3))
    out = pd.DataFrame(stages)
    if len(out):
        out["sim_over_real_total"] = out.sim_total_s / out.real_total_s
    mixed = []
    for name, d in (("real", r), ("sim", s)):
        m = d[d.stage == "mixed"].copy()
        m["decodes"] = m.batch_size - 1
        m["chunk"] = pd.cut(m.tokens - m.decodes, CHUNK_BINS)
        m["decode_seqs"] = pd.cut(m.decodes, MIXED_DECODE_BINS)
        g = m.groupby(["chunk", "decode_seqs"], observed=True).agg(
            steps=("per", "size"), ms=("per", "median"), kv=("kv_tokens", "median"))
        g["ms"] *= 1e3
        mixed.append(g.add_prefix(f"{name}_"))
    table = mixed[0].join(mixed[1], how="outer")
    table["sim_over_real"] = table.sim_ms / table.real_ms
    return out.round(3), table.round(3)


COLOCATED_DECODE_BINS = [0, 4, 16, 64, 128, 192, 256, 1 << 20]  # (lo, hi] decode sequences of a GPU0 step


def colocated_step_frame(run: Path, cost) -> pd.DataFrame:
    """A colocated run's GPU0 decode and mixed steps, each against the simulator's cost at the step's own shape:
    the real period (the step plus the gap to the next one, as the engine_* rows are timed) over what the sim
    would charge it (GPU0's decode factor x the decode step, or the mixed step's forward_s, + the engine
    overhead, + the decode tail of the longest context then decoding). The comparison of the two runs' steps
    (colocated_steps) mixes this bias with the queueing it feeds: a run modelled 2% slow near saturation
    decodes at larger batches. A mixed step's chunk is taken as one prompt with no cached prefix (steps.csv
    has neither), so continuation chunks of long prompts are modelled short. One row a step: stage, decodes,
    chunk, real and model seconds, the longest decoding context's excess over the mean (`excess`) and its
    place in the batch's join order, the grid's order (`longest_at`, 0 first .. 1 last)."""
    steps = pd.read_csv(run / "steps.csv")
    g = steps[(steps.device == "gpu0") & steps.stage.isin(["decode", "mixed"])].sort_values("t_start_s")
    allg0 = steps[steps.device == "gpu0"].sort_values("t_start_s")
    s0 = allg0.t_start_s.to_numpy()
    nxt = np.searchsorted(s0, g.t_end_s.to_numpy(), side="left")
    gap = np.where(nxt < len(s0), s0[np.clip(nxt, 0, len(s0) - 1)] - g.t_end_s.to_numpy(), np.inf)
    n = g.num_steps.clip(lower=1).to_numpy()
    d = pd.DataFrame(dict(stage=g.stage.to_numpy(), b=g.batch_size.to_numpy(), tokens=g.tokens.to_numpy(),
                          kv=g.kv_tokens.to_numpy(),
                          real=(g.t_end_s.to_numpy() - g.t_start_s.to_numpy() + np.where(gap < QUEUED_GAP_S, gap, 0.0)) / n))
    d["decodes"] = np.where(d.stage == "mixed", d.b - 1, d.b)
    d["chunk"] = np.where(d.stage == "mixed", d.tokens - d.decodes, 0)
    contexts = decoding_contexts(pd.read_csv(run / "requests.csv"), g.t_start_s.to_numpy(), "gpu0")
    longest = [c.max() if len(c) else 0 for c in contexts]
    d["excess"] = [c.max() - c.mean() if len(c) else 0.0 for c in contexts]
    d["longest_at"] = [c.argmax() / (len(c) - 1) if len(c) > 1 else 0.0 for c in contexts]
    model = []
    for st, b, c, kv, m in zip(d.stage, d.decodes, d.chunk, d.kv, longest):
        b, c, kv = int(b), int(c), int(kv)
        if st == "decode":
            t = cost.decode_device_factor("gpu0", b) * cost.decode_step(b, kv).step_s
            t += cost.engine_overhead_s("decode", b, kv, False, True)  # a one-GPU engine's (colocated) overhead
        else:
            kv -= c
            t = cost.forward_s([(c, 0)], b, kv) + max(cost.engine_overhead_s("prefill", 1, c, False, True),
                                                       cost.engine_overhead_s("decode", b, kv, False, True))
        tail = cost.decode_tail_s(b, kv + b, int(m)) * cost.decode_tail_scale(b, m - kv / b) if b and m else 0.0
        model.append(t + tail)
    d["model"] = model
    return d


def colocated_at_shape(run: Path, cost, d: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """colocated_step_frame's steps (`d`, if already built) summed: (by stage and decode batch, mixed by chunk
    tokens and decode batch); totals in the rows named "all"."""
    d = colocated_step_frame(run, cost) if d is None else d
    by_batch = _by_group_and_batch(d, "stage", "decodes", COLOCATED_DECODE_BINS).round(3)
    mixed = d[d.stage == "mixed"]
    by_chunk = _sums(mixed.groupby([pd.cut(mixed.chunk, CHUNK_BINS), pd.cut(mixed.decodes, MIXED_DECODE_BINS)],
                                   observed=True)).round(3)
    return by_batch, by_chunk


LONG_EXCESS_BINS = [-1, 1000, 2000, 4000, 1 << 20]  # the longest context over the batch's mean, tokens
BIG_DECODE_BINS = [31, 64, 128, 192, 256]


def colocated_beyond_model(d: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """colocated_step_frame's decode steps of 32+ sequences: what the real step took beyond the modelled one
    (medians, ms), (by decode batch and the longest context's excess over the mean, and, for an excess over
    1,500 tokens, by decode batch and the third of the batch the longest sat in). Why: single's steps of 129-256
    sequences ran 16-29% over the model in session 15's first two rounds where those of <= 128 were within 7%, and
    only with a long sequence in the batch; a long sequence whose programs sit late in the kernel's grid may
    start only when a wave drains (bench/decode_tail_order.py times it)."""
    dec = d[(d.stage == "decode") & (d.decodes >= 32)].assign(beyond=lambda x: (x.real - x.model) * 1e3,
                                                              real_ms=lambda x: x.real * 1e3)
    batch = pd.cut(dec.decodes, BIG_DECODE_BINS)
    agg = dict(steps=("beyond", "size"), real_ms=("real_ms", "median"), beyond_ms=("beyond", "median"),
               excess=("excess", "median"))
    by_excess = dec.groupby([batch, pd.cut(dec.excess, LONG_EXCESS_BINS)], observed=True).agg(**agg).round(2)
    long = dec[dec.excess > 1500]
    third = pd.cut(long.longest_at, [-0.01, 1 / 3, 2 / 3, 1.0], labels=["first third", "middle", "last third"])
    by_place = long.groupby([batch[long.index], third], observed=True).agg(**agg).round(2)
    return by_excess, by_place


def _sums(groups) -> pd.DataFrame:
    """Steps, their real and modelled seconds and the ratio, per group of an *_at_shape frame (real, model)."""
    out = groups.agg(steps=("real", "size"), real_s=("real", "sum"), model_s=("model", "sum"))
    out["model_over_real"] = out.model_s / out.real_s
    return out


def _by_group_and_batch(d: pd.DataFrame, group: str, batch: str, bins) -> pd.DataFrame:
    """_sums by (group, batch bin), each group's totals in a bin named "all"."""
    by_batch = _sums(d.groupby([group, pd.cut(d[batch], bins)], observed=True))
    totals = _sums(d.groupby(group)).assign(**{batch: "all"}).set_index(batch, append=True)
    return pd.concat([by_batch, totals.rename_axis(by_batch.index.names)])


def decoding_contexts(reqs: pd.DataFrame, times: np.ndarray, device: str = "gpu1") -> list[np.ndarray]:
    """The contexts of the requests decoding on `device` at each time, in the order they joined the decode
    batch (the scheduler's running list, which the engine slices into micro-batches): a request decodes from
    its KV's arrival (or first token) to its end, its context growing evenly from prompt + 1 to prompt + its
    generated tokens (requests.csv has no per-step contexts)."""
    r = reqs[reqs.decode_device == device]
    start = r.kv_transfer_end_s.fillna(r.first_token_s).to_numpy(dtype=float)
    order = np.argsort(start, kind="stable")
    start = start[order]
    end, prompt = r.finish_s.to_numpy(dtype=float)[order], r.prompt_tokens.to_numpy(dtype=float)[order]
    grown = np.maximum(r.generated_tokens.to_numpy(dtype=float)[order] - 1, 0)
    out = []
    for t in times:
        on = (start <= t) & (end > t)
        out.append(prompt[on] + 1 + (t - start[on]) / np.maximum(end[on] - start[on], 1e-9) * grown[on])
    return out


DECODE_AT_SHAPE_BINS = [0, 4, 16, 32, 64, 128, 192, 256, 1 << 20]  # (lo, hi] sequences of a GPU1 decode step


def gpu1_step_frame(run: Path, cost) -> pd.DataFrame:
    """A run's GPU1 decode steps, one row each, against the simulator's cost at the step's own shape: `real`, the
    period (the step plus the gap to the next one, as the engine_* rows are timed); the sim's charge in parts:
    `iso_s` the isolated step (sequential, or pipelined on its split), `tail_s` the decode tail of each micro-batch
    (the requests then decoding, sliced in the order they joined; sim/cost_model.py microbatch_tail_s),
    `overhead_s` the engine overhead by GPU0's state, `copy_s` each overlapping KV copy's interference in the share
    of the copy it overlapped; `model` their sum. Also t (start, s), b, kv, attn_sms, ffn_sms, num_steps and
    `contexts` (the decoding contexts in join order, decoding_contexts)."""
    from sim.cost_model import microbatch_tail_s

    steps = pd.read_csv(run / "steps.csv")
    reqs = pd.read_csv(run / "requests.csv")
    g1 = _gpu1_decode_rows(steps).sort_values("t_start_s")
    g0 = steps[steps.device == "gpu0"].sort_values("t_start_s")
    s1, e1 = g1.t_start_s.to_numpy(), g1.t_end_s.to_numpy()
    n = g1.num_steps.clip(lower=1).to_numpy()
    busy = _on(g0.t_start_s.to_numpy(), g0.t_end_s.to_numpy(), s1)
    b, kv = g1.batch_size.to_numpy(), g1.kv_tokens.to_numpy()
    a, f = g1.attn_sms.to_numpy(), g1.ffn_sms.to_numpy()
    iso, tail, over, copy = (np.zeros(len(g1)) for _ in range(4))
    contexts = decoding_contexts(reqs, s1)
    for i, ctx in enumerate(contexts):
        split = (int(a[i]), int(f[i])) if a[i] else None
        m = 2 if split else 1
        iso[i] = cost.decode_step(int(b[i]), int(kv[i]), split, m).step_s
        tail[i] = microbatch_tail_s(cost, [int(c) - 1 for c in ctx], m, split) if len(ctx) else 0.0
        over[i] = cost.engine_overhead_s("decode", int(b[i]), int(kv[i]), bool(busy[i]))
    copy_cost = getattr(cost, "copy_interference_s", None)
    if copy_cost is not None:
        for _, t in steps[(steps.device == "link") & (steps.kv_bytes > 0)].iterrows():
            lo, hi = np.searchsorted(e1, t.t_start_s, side="right"), np.searchsorted(s1, t.t_end_s, side="left")
            span = max(t.t_end_s - t.t_start_s, 1e-9)
            for i in range(lo, hi):
                share = (min(e1[i], t.t_end_s) - max(s1[i], t.t_start_s)) / span
                if share > 0:
                    copy[i] += share * copy_cost(int(t.kv_bytes), int(b[i]))
    return pd.DataFrame(dict(t=s1, b=b, kv=kv, attn_sms=a, ffn_sms=f, num_steps=n,
                             real=(e1 - s1 + _gap_after(s1, e1)) / n, iso_s=iso, tail_s=tail, overhead_s=over,
                             copy_s=copy, model=iso + tail + over + copy, contexts=contexts))


def decode_at_shape(run: Path, cost, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """gpu1_step_frame's real period against the sim's charge, summed by split and batch bin (steps, real_s,
    model_s, model_over_real), totals in the rows named "all". Why: a run's TPOT error mixes this per-step bias
    with the queueing it feeds (near saturation a step 3% slow grows the batch, and TPOT more); this reads the
    step bias alone. `frame`: the run's gpu1_step_frame, if already built."""
    g = gpu1_step_frame(run, cost) if frame is None else frame
    d = pd.DataFrame(dict(split=np.where(g.attn_sms > 0, "pipelined", "sequential"), b=g.b, real=g.real,
                          model=g.model))
    out = _by_group_and_batch(d, "split", "b", DECODE_AT_SHAPE_BINS)
    out["model_over_real"] = out.model_over_real.round(4)
    return out


def overhead_at_shape(run: Path, cost, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """gpu1_step_frame by split and batch bin: what the served steps ran over the sim's isolated step + tail + KV
    copies (`served_extra_ms`, median) beside the engine overhead the sim charges them (`modelled_ms`, median), and
    modelled - served. Why: on six 2x H200 machines (sessions 19-24) pipeline's steps of 129-256 sequences ran
    0.41-1.03 ms over that model while their own profile charged 0.14-1.44 ms, and pipeline's TPOT error rose with
    the difference in the same order on all six (+15.0% where it read +1.03 ms, -7.3% at -0.70). `frame`: as decode_at_shape."""
    g = gpu1_step_frame(run, cost) if frame is None else frame
    d = pd.DataFrame(dict(split=np.where(g.attn_sms > 0, "pipelined", "sequential"),
                          b=pd.cut(g.b, DECODE_AT_SHAPE_BINS),
                          extra=(g.real - g.iso_s - g.tail_s - g.copy_s) * 1e3, modelled=g.overhead_s * 1e3))
    out = d.groupby(["split", "b"], observed=True).agg(steps=("extra", "size"), served_extra_ms=("extra", "median"),
                                                         modelled_ms=("modelled", "median"))
    out["modelled_minus_served_ms"] = out.modelled_ms - out.served_extra_ms
    return out.round(3)


def over_time(run: Path, bin_s: float = 2.0) -> pd.DataFrame:
    steps, reqs = pd.read_csv(run / "steps.csv"), pd.read_csv(run / "requests.csv")
    dec = _gpu1_decode_rows(steps)
    k = (dec.t_start_s // bin_s).astype(int)
    w = dec.t_end_s - dec.t_start_s
    return pd.DataFrame({"batch": (dec.batch_size * w).groupby(k).sum() / w.groupby(k).sum(),
                         "tok/s": (dec.batch_size * dec.num_steps).groupby(k).sum() / bin_s,
                         "arrived/s": reqs.groupby((reqs.arrival_s // bin_s).astype(int)).size() / bin_s,
                         "served/s": reqs.groupby((reqs.finish_s // bin_s).astype(int)).size() / bin_s}).round(1)


SPLIT_SHARE_BINS = [0, 4, 16, 32, 64, 128, 256, 1 << 20]  # (lo, hi] sequences of a GPU1 decode step


def split_share(run: Path) -> pd.Series:
    """The share of GPU1's decode steps run pipelined (on an attention:FFN split) by decode batch (a merged sim row
    counting its steps). Why: adaptive's rebalancer picks a split from measured step times, so a small bias in the
    modelled pipelined / sequential ratio can flip its choice; on the held-out workload (2x H200, session 15) the
    simulated adaptive pipelined 66-76% of its steps of 17-64 sequences where the real one pipelined 1-20%."""
    dec = _gpu1_decode_rows(pd.read_csv(run / "steps.csv"))
    n = dec.num_steps.clip(lower=1)
    on = n.where(dec.attn_sms > 0, 0)
    groups = pd.cut(dec.batch_size, SPLIT_SHARE_BINS)
    return (on.groupby(groups, observed=True).sum() / n.groupby(groups, observed=True).sum()).round(3)


DUEL_NEIGHBOURS = 6  # sequential steps looked at on each side of a block of pipelined ones


def challenger_blocks(run: Path, min_batch: int = 8) -> pd.DataFrame:
    """Each run of consecutive pipelined GPU1 decode steps on one split (what adaptive's rebalancer runs as a
    challenger, or a pipeline's stretch) against the sequential steps around it: their cost per sequence over
    the mean of up to DUEL_NEIGHBOURS sequential steps on each side at the block's batch (within 1/16, as the
    rebalancer compares), a merged sim row weighing its num_steps. One row a block: start time, batch (median),
    split's attention SMs, steps, context per sequence, `ratio` (> 1: the split lost). Why: on the held-out
    workload the real rebalancer's 96:36 challengers lost by 6-18% (session 15) and 8-31% (session 17) while the
    noise-free sim had the first such duel within its 2% margin, so a run's step-time draws decided them."""
    dec = _gpu1_decode_rows(pd.read_csv(run / "steps.csv")).sort_values("t_start_s").reset_index(drop=True)
    n = dec.num_steps.clip(lower=1).to_numpy()
    cost = ((dec.t_end_s - dec.t_start_s) / n / dec.batch_size.clip(lower=1)).to_numpy()
    split, b = dec.attn_sms.to_numpy(), dec.batch_size.to_numpy()
    out = []
    i = 0
    while i < len(dec):
        if split[i] <= 0:
            i += 1
            continue
        j = i
        while j + 1 < len(dec) and split[j + 1] == split[i]:
            j += 1
        batch = int(np.median(b[i:j + 1]))
        around = list(range(max(0, i - DUEL_NEIGHBOURS), i)) + list(range(j + 1, min(len(dec), j + 1 + DUEL_NEIGHBOURS)))
        near = [k for k in around if split[k] <= 0 and abs(b[k] - batch) <= batch // 16]
        if batch >= min_batch and near:
            w = n[i:j + 1]
            out.append(dict(t_s=float(dec.t_start_s[i]), batch=batch, attn_sms=int(split[i]), steps=int(w.sum()),
                            context=float(dec.kv_tokens[i] / max(1, b[i])),
                            ratio=float(np.average(cost[i:j + 1], weights=w) / np.average(cost[near], weights=n[near]))))
        i = j + 1
    return pd.DataFrame(out, columns=["t_s", "batch", "attn_sms", "steps", "context", "ratio"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", type=int, default=10,
                    help="step-time draws (seeds 0..N-1) of each what-if with a spread")
    args = ap.parse_args()
    from analysis.fidelity import compare_runs
    from fidelity_bench import _flag, extract_runs, real_settings, replicate_groups
    from sim.calibrated import pick_profile
    from sim.cost_model import make_cost_model
    from sim.run import simulate
    from traces.profile import ENGINE_OPS, read_profile, write_profile
    from traces.run_folder import write_run
    from traces.workload import make_workload

    work = Path(tempfile.mkdtemp(prefix="fidelity-diag-"))
    runs = {}
    for group in replicate_groups(extract_runs(args.runs, work)):
        runs[json.loads((group[0] / "run.json").read_text())["policy"]] = group[0]
        for extra in group[1:]:  # fidelity_bench --repeat: diagnose the first run of each policy
            print(f"note: {extra.name} is a replicate of {group[0].name}: not diagnosed", file=sys.stderr)
    out: dict = {}
    prepared = {}
    for policy, real in runs.items():
        info = json.loads((real / "run.json").read_text())
        hardware = "h200x2" if "H200" in info["hardware"]["device"] else "h100x2"
        profile = pick_profile(hardware, args.model, profile=args.profile)
        cost = make_cost_model(hardware, args.model, kind="calibrated", profile=profile)
        rate = float(_flag(info.get("command", ""), "--rate-scale", "1"))
        workload = make_workload(args.trace or info["workload"]["source"], num_requests=info["workload"]["requests"],
                                 rate_scale=rate, seed=info.get("seed", 0))
        prepared[policy] = (real, info, hardware, profile, cost, workload)

    def sim(policy: str, profile, name: str, seed: int | None = None, merged: bool = True) -> tuple[Path, dict]:
        real, info, hardware, _, _, workload = prepared[policy]
        settings = real_settings(info)
        if not merged:
            settings["sim_config"] = replace(settings["sim_config"], max_merged_steps=1)
        res = simulate(workload, policy=policy, hardware=hardware, model=args.model, profile=profile, seed=seed,
                       **settings)
        d = work / f"sim-{policy}-{name}"
        write_run(d, requests=res.requests, steps=res.steps, decisions=res.decisions,
                  run_info=dict(backend="sim", policy=policy), summary=res.summary)
        return d, compare_runs(d, real)["rel_err"]

    def sim_seeds(policy: str, profile, name: str, merged: bool = True) -> tuple[dict, dict]:
        """The mean relative errors over the seeds, and each seed's."""
        each = {s: sim(policy, profile, f"{name}-{s}", s, merged)[1] for s in range(args.seeds)}
        return {m: float(np.mean([e[m] for e in each.values()])) for m in each[0]}, each

    derived = {}
    for policy, (real, info, hardware, profile, cost, workload) in prepared.items():
        print(f"\n===== {policy}: {info['command']}")
        sim_dir, err = sim(policy, profile, "as-committed")
        if not _has_gpu1_decode(real):  # colocated (single): GPU0's steps by stage and shape, real vs sim
            print("prefill and decode colocated on GPU0: its steps, real vs sim")
            stages, mixed = colocated_steps(pd.read_csv(real / "steps.csv"), pd.read_csv(sim_dir / "steps.csv"))
            print(stages.to_string(index=False))
            print("\n-- mixed steps (ms, median) by prefill chunk tokens and decode sequences: real, sim")
            print(mixed.to_string())
            frame = colocated_step_frame(real, cost)
            at_batch, at_chunk = colocated_at_shape(real, cost, frame)
            print("\n-- GPU0 steps of the real run, each against the sim's cost at its own shape (real period; no queueing "
                  "feedback): by stage and decode sequences")
            print(at_batch.to_string())
            print("\n-- the mixed ones by prefill chunk tokens and decode sequences (chunks modelled with no cached prefix)")
            print(at_chunk.to_string())
            by_excess, by_place = colocated_beyond_model(frame)
            print("\n-- GPU0 decode steps of 32+ sequences: real minus the modelled step (beyond, ms, median) by decode "
                  "sequences and the longest context's excess over the mean (tokens)")
            print(by_excess.to_string())
            print("\n-- the same with an excess over 1,500 tokens, by the third of the batch (join order) the longest sat in")
            print(by_place.to_string())
            out[policy] = dict(what_if={"the committed profile (its own engine_* rows, if any)": err},
                               colocated_at_shape=[dict(stage=st, decodes=str(b), **row.to_dict())
                                                   for (st, b), row in at_batch.iterrows()],
                               colocated_beyond_model_by_excess=[dict(decodes=str(b), excess_bin=str(e), **row.to_dict())
                                                                 for (b, e), row in by_excess.iterrows()],
                               colocated_beyond_model_by_place=[dict(decodes=str(b), place=str(p), **row.to_dict())
                                                                for (b, p), row in by_place.iterrows()],
                               colocated_mixed_at_shape=[dict(chunk=str(c), decodes=str(b), **row.to_dict())
                                                         for (c, b), row in at_chunk.iterrows()],
                               colocated_stages=stages.to_dict("records"),
                               colocated_mixed=[dict(chunk=str(c), decode_seqs=str(d), **{k: (None if v != v else v)
                                                for k, v in row.items()})
                                                for (c, d), row in mixed.iterrows()])
            continue
        dec, pre = step_tables(real, cost)
        sdec, spre = step_tables(sim_dir, cost)
        span = pd.read_csv(real / "requests.csv")
        arrive_rps = len(span) / span.arrival_s.max()
        print(f"arrival rate {arrive_rps:.1f} req/s; served {len(span) / span.finish_s.max():.1f} req/s (real) "
              f"over {span.finish_s.max():.1f} s")
        print("\n-- decode batch and throughput over time (2 s bins): real | sim")
        print(pd.concat([over_time(real), over_time(sim_dir)], axis=1, keys=["real", "sim"]).to_string())
        shares = pd.DataFrame({"real": split_share(real), "sim": split_share(sim_dir)})
        if shares.fillna(0).to_numpy().any():
            print("\n-- share of GPU1 decode steps run pipelined, by decode batch: real, sim")
            print(shares.to_string())
            if info["policy"] == "adaptive":
                duels = {k: challenger_blocks(d) for k, d in (("real", real), ("sim", sim_dir))}
                print("\n-- challenger blocks (pipelined runs between sequential steps, >= 8 sequences): cost per "
                      "sequence over the sequential steps around them, by split: real, sim")
                print(pd.concat({k: v.groupby("attn_sms").ratio.describe()[["count", "min", "50%", "max"]]
                                 for k, v in duels.items() if len(v)}, axis=0).round(3).to_string())
        print("\n-- GPU1 decode step (ms, median) by batch: real by GPU0 state, isolated profile + decode tail of "
              "the longest context (tail alone), sim")
        table = by_bucket(dec, sdec)
        print(table.to_string(index=False))
        if dec.split.any():
            print("\n-- GPU1 pipelined decode steps (ms, median) by batch: the same columns, steps on a split")
            print(by_bucket(dec, sdec, split=True).to_string(index=False))
        print("\n-- GPU0 prefill step (ms, median) by sequences: real, isolated profile at the same prompts, sim")
        pt = pd.DataFrame([dict(seqs=k, steps=len(g), tokens=int(g.tokens.median()), real=g.dur.median() * 1e3,
                                profile=g.iso.median() * 1e3, gap=g.gap.median() * 1e3,
                                sim=spre[spre.seqs == k].dur.median() * 1e3)
                           for k, g in pre.groupby(np.minimum(pre.seqs, 8))]).round(2)
        print(pt.to_string(index=False))
        print("\n-- GPU0 prefill step (ms, median) by sequences (3: 3 or more) and tokens: real, and the model at the "
              "same prompts (isolated step + engine overhead by GPU1's state)")
        by_tokens, prefill_err = prefill_by_tokens(pre, cost)
        print(by_tokens.to_string())
        print(f"model over real, all prefills: median |error| {prefill_err['median_abs_rel_err']:.1%}, "
              f"total {prefill_err['total_rel_err']:+.1%}")
        steps = pd.read_csv(real / "steps.csv")
        idle_before = prefill_extra_by_idle_before(steps, pre, cost)
        print("\n-- GPU0 1-sequence prefills by GPU0's idle time before the launch and GPU1's state: real step over "
              "the isolated one (extra, ms, median) and the engine overhead the sim adds (model)")
        print(idle_before.to_string())
        gaps = {}
        for dev in ("gpu0", "gpu1"):
            g = steps[steps.device == dev].sort_values("t_start_s")
            gap = g.t_start_s.to_numpy()[1:] - g.t_end_s.to_numpy()[:-1]
            span_s = g.t_end_s.max() - g.t_start_s.min()
            gaps[dev] = dict(steps=len(g), busy_share=float((g.t_end_s - g.t_start_s).sum() / span_s),
                             gap_p50_us=float(np.median(gap) * 1e6), gap_p99_us=float(np.percentile(gap, 99) * 1e6),
                             queued_gap_total_s=float(gap[gap < QUEUED_GAP_S].sum()))
        print("\n-- gaps between consecutive steps (host time outside step rows)")
        print(pd.DataFrame(gaps).T.round(3).to_string())
        print("\n-- GPU1 decode steps at batch >= 32 by the batch's longest context: real over the isolated "
              "profile, real extra and modelled decode tail (ms, medians)")
        longest = by_longest_context(dec)
        print(longest.to_string())
        if dec.split.any():  # the simulator gives each micro-batch its own tail (sim/cost_model.py microbatch_tail_s)
            print("\n-- the same for pipelined (split) decode steps, against one kernel's tail")
            print(by_longest_context(dec, split=True).to_string())
        overlap = by_transfer_overlap(dec)
        if len(overlap):
            print("\n-- GPU1 decode steps at batch >= 32 by GPU0's state and a KV copy into GPU1 overlapping them: "
                  "real over the modelled step (isolated profile + tail; medians)")
            print(overlap.to_string())
        frame = gpu1_step_frame(real, cost)  # once: both tables below read it
        at_shape = decode_at_shape(real, cost, frame)
        print("\n-- GPU1 decode steps of the real run, each against the sim's cost at its own shape (real period; "
              "isolated step + each micro-batch's tail + engine overhead by GPU0's state + KV copies; no queueing "
              "feedback): by split and batch")
        print(at_shape.to_string())
        overhead = overhead_at_shape(real, cost, frame)
        print("\n-- the same steps: what they ran over the isolated step + tail + KV copies (served extra) beside "
              "the engine overhead the sim charges them (medians, ms)")
        print(overhead.to_string())
        corr = step_correlation(dec)
        corr_plain = step_correlation(dec, tail=False)
        print("\n-- GPU1 decode steps over their shape's expected period (with the decode tail | without): "
              "correlation from step to step (sim/variability.py draws them independently)")
        print(pd.DataFrame({"with tail": corr, "without": corr_plain}).round(3).to_string())
        derived[policy] = engine_rows(dec, pre, cost)
        derived[policy, "pooled"] = engine_rows(dec, pre, cost, by_state=False)
        derived[policy, "no gaps"] = engine_rows(dec, pre, cost, by_state=False, gaps=False)
        derived[policy, "bucket"] = engine_rows(dec, pre, cost, around="bucket")
        out[policy] = dict(arrival_rps=arrive_rps, decode=table.to_dict("records"), prefill=pt.to_dict("records"),
                           split_share={str(b): {k: (None if v != v else v) for k, v in row.items()}
                                        for b, row in shares.to_dict("index").items()},
                           prefill_model_error=prefill_err,
                           prefill_extra_by_idle_before=[dict(idle_before=i, gpu1=g, **row.to_dict())
                                                         for (i, g), row in idle_before.iterrows()],
                           gaps=gaps, step_correlation=corr, step_correlation_without_tail=corr_plain,
                           by_longest_context={str(k): v for k, v in longest.to_dict("index").items()},
                           by_transfer_overlap={" / ".join(k): v for k, v in overlap.to_dict("index").items()},
                           decode_at_shape=[dict(split=sp, batch=str(bb), **row.to_dict())
                                            for (sp, bb), row in at_shape.iterrows()],
                           overhead_at_shape=[dict(split=sp, batch=str(bb), **row.to_dict())
                                              for (sp, bb), row in overhead.iterrows()],
                           engine_rows=derived[policy],
                           what_if={"the committed profile (its own engine_* rows, if any)": err})

    both = ("engine_decode", "engine_prefill")
    by_state = both + ("engine_decode_busy", "engine_prefill_busy")
    variants = [("+ decode overhead without the gaps (GPU0 state pooled)", "no gaps", ("engine_decode",)),
                ("+ decode overhead (GPU0 state pooled)", "pooled", ("engine_decode",)),
                ("+ prefill overhead (pooled)", "pooled", both),
                ("+ decode and prefill overhead by the other GPU's state", None, by_state)]
    spread_variants = [  # the overhead by state + the spread (name, rows, spread on which ops, merged runs)
        ("decode spread", "shape", ("engine_decode", "engine_decode_busy"), True),
        ("decode and prefill spread", "shape", by_state, True),
        ("decode and prefill spread, runs not merged", "shape", by_state, False),
        ("decode and prefill spread around bucket means", "bucket", by_state, True)]
    print("\n===== what-if: engine_* rows estimated from the real runs (IN-SAMPLE), relative errors sim vs real")
    for policy, (real, info, hardware, profile, cost, workload) in prepared.items():
        if policy not in derived:
            continue
        df, meta = read_profile(profile)
        base = [r for r in df.to_dict("records") if r["op"] not in ENGINE_OPS]  # the isolated profile (+ tail)
        meta = {k: v for k, v in meta.items() if k != "engine_rows"}  # rows below already exclude the tail
        path = work / f"profile-{policy}-isolated.csv"
        write_profile(path, base, meta)
        out[policy]["what_if"]["isolated profile + decode tail, no engine rows"] = sim(policy, path, "isolated")[1]
        others = [p for p in prepared if p != policy and p in derived]
        cases = [(name, without_spread(derived[(policy, kind) if kind else policy]), ops)
                 for name, kind, ops in variants]
        cases += [(f"as the last, rows from the {o} run", without_spread(derived[o]), by_state) for o in others]
        for name, rows, ops in cases:
            path = work / f"profile-{policy}-{abs(hash(name))}.csv"
            write_profile(path, base + [r for r in rows if r["op"] in ops], meta)
            out[policy]["what_if"][name] = sim(policy, path, str(abs(hash(name))))[1]
        out[policy]["what_if_seeds"] = {}
        for i, (name, around, spread_ops, merged) in enumerate(spread_variants):
            rows = [r if r["op"] in spread_ops else without_spread([r])[0]
                    for r in derived[(policy, around) if around != "shape" else policy] if r["op"] in by_state]
            path = work / f"profile-{policy}-spread-{i}.csv"
            write_profile(path, base + rows, meta)
            name = f"overhead by state + {name} ({args.seeds} seeds)"
            out[policy]["what_if"][name], out[policy]["what_if_seeds"][name] = sim_seeds(policy, path, f"s{i}", merged)
        print(f"\n{policy}")
        print(pd.DataFrame({k: {m: v[m] for m in KEYS} for k, v in out[policy]["what_if"].items()}).T
              .map(lambda v: f"{v:+.3f}").to_string())
        print(f"\n{policy}, spread what-ifs seed by seed: min / median / max relative error, seeds within 8%")
        print(pd.DataFrame({name: {m: _seed_range([e[m] for e in each.values()]) for m in KEYS[1:]}
                            for name, each in out[policy]["what_if_seeds"].items()}).T.to_string())
    if args.json:
        from datetime import date

        head = dict(date=date.today().isoformat(),
                    command="python bench/fidelity_diagnose.py " + " ".join(sys.argv[1:]),
                    note="engine_rows and what_if rows derived from the runs are IN-SAMPLE; the committed profile and the isolated profile + tail are not")
        Path(args.json).write_text(json.dumps({**head, **out}, indent=1, default=float) + "\n")
        print(f"\nwrote {args.json}")
    shutil.rmtree(work, ignore_errors=True)  # the extracted and simulated runs: the report above is the result
    return 0


if __name__ == "__main__":
    sys.exit(main())
