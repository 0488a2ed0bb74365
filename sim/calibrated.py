"""CalibratedCostModel: the simulator's stage times interpolated from a measured profile.

The profile (traces/profile.py; `python -m real.profile` writes traces/profiles/<hardware>-<model>.csv)
holds median times of whole steps and single layers on a small grid of shapes. This model answers
the `CostModel` protocol of sim/cost_model.py from it, and asks the `AnalyticCostModel` for whatever
the profile lacks (`describe()` says which op comes from where).

Why piecewise-linear interpolation (as SplitwiseSim) and not a learned regressor (Vidur's random
forests): the grid is small (tens of shapes per op) and dense where the policies operate; a forest
wants hundreds of samples, is piecewise-constant, does not reproduce a measured point and flattens
beyond the data. Interpolation reproduces every measured point exactly and its error between points
is bounded by the curvature of the cost, which is small:
- at a fixed batch, a decode step is linear in the context (KV bytes read); linear interpolation in
  context keeps it so, which the simulator's merged decode runs rely on (sim/engine.py sums them as
  linear in KV tokens);
- in batch (and prefill tokens) a step is a roofline, a convex max of affine pieces: interpolation
  linear in batch is exact on each piece. Log(batch) axes were rejected: on a doubling grid they
  overshoot an affine cost by up to ~6% mid-octave.
- Outside the measured range: linear extrapolation from the last two points, slope clamped >= 0
  (a cost never falls beyond the data), value clamped >= 0. A batch measured at one context only
  (the largest batches fit only short contexts in the profiler's KV cache) takes the context slope
  of the nearest batch measured at several, scaled by the batch ratio.
Every call is a dict lookup, a bisect and a multiply-add: the context line of each batch size is
built once (blending the two measured batches around it) and cached.

Per op (L = layers of the ModelSpec, D(b, c) = decode rows at batch b, context c):
- decode_step(b, kv): D(b, kv / b), a whole step as the engine runs it (`host` rows, the staging and
  launch inside it, are only reported). Busy: L x whole-GPU attn/ffn layer rows when both exist
  (scaled down together if they add up to more than the step; along context with the analytic
  attention's shape when one context was measured), else the analytic busy times scaled to the step.
- decode_step(b, kv, split, m): pipeline rows for m micro-batches, blended linearly between the two
  measured attn_sms around the split (nearest outside); else, with m >= 2, pair + whole-GPU seq (or
  attn + ffn) rows: the calibrated sequential step with its layer part (all but the analytic LM-head
  share) scaled by m * pair(b/m) / seq(b); else the analytic ratio pipelined / sequential times the
  calibrated sequential step. Busy: the analytic model's attention/FFN shares of the step, cached
  per (split, micro-batches, batch, power-of-two context).
- forward_s(chunks): prefill rows of the smallest measured batch (one sequence) give the ratio
  measured / analytic, interpolated over (total tokens, token-weighted prefix context) and held at
  the edges; rows of more sequences give a factor on it, linear in sequences (1 at one sequence),
  held in tokens (real.profile packs 1,024-token prompts, the shapes a loaded prefill GPU runs).
  The ratio multiplies the analytic cost of the actual chunks, so how tokens split into sequences
  still counts (causal attention is quadratic per sequence: eight 512-token prompts cost about half
  one of 4,096). Where one context was measured, the prefix term is the analytic one, scaled.
  Where the profile's metadata lists the engine's prefill CUDA-graph token buckets (`prefill_graphs`),
  a batch that fits one pays for its padding rows too (matmuls and elementwise ops, no attention): at the
  measured cost of a step without attention, M(tokens + pad) - M(tokens), M solved at each bucket from the
  1-sequence and packed rows (`_build_pad_line`); without packed rows, the analytic cost at the padded
  size times the ratio there.
- forward_s(chunks, b, kv), a mixed step: as the engine runs it (real/runner.py), a decode pass and a
  prefill pass sharing one LM head: prefill + decode_step(b, kv) - the analytic cost of the LM head
  and sampling saved by sharing; with `mixed` rows (colocated steps timed whole) that composition times
  mixed row / composition at the rows' shapes (decode batch x chunk tokens, held beyond them). (The
  analytic model fuses them into one roofline instead, which hides the decodes' KV reads under the
  prefill's compute.) forward_s([], b, kv) is decode_step.
- transfer_s(bytes): least-squares latency + bytes / bandwidth over transfer rows.
- copy_interference_s(bytes, b): what one KV copy into the decode GPU adds to the decode steps of batch b it
  overlaps: bytes x a per-byte cost fitted through the origin to the decode_copy rows of each measured batch,
  linear in batch between them; 0 without decode_copy rows.
- decode_device_factor(device, b): GPU0's decode step over the decode rows' GPU (GPU1) for single and dp,
  from decode_prefill_gpu rows (a few decode rows timed on the prefill GPU), linear in batch, held beyond;
  1 without them and on GPU1.
- decode_tail_s(b, kv, longest): what mixed context lengths add to a decode step: layers x one unsplit
  program's time (decode_program rows) for longest - mean context, / the kernel's context splits (which
  follow the batch padded to the engine's decode graph bucket, `decode_graphs` metadata: graph_batch); 0
  without decode_program rows.
- engine_overhead_s(stage, ..., colocated): what the real engine's body adds to a step, engine_* row - the isolated
  step above (plus the tail of the rows' own context spread) at the same shape, by the other GPU's state
  (sim/overhead.py); colocated (policy single's one-GPU engine): from engine_decode_single rows less GPU0's
  isolated step and engine_prefill_single rows less the isolated prefill, where there are any; 0 without
  engine_* rows.
- engine_step_spread(stage, ...): the quantiles of those rows' periods over their mean, which the simulator
  draws each step's time from (sim/variability.py); None without spread columns.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from policies.specs import HardwareSpec, ModelSpec, decode_context_splits, hardware_spec, model_spec
from traces.profile import (OPS, ProfileError, collapse_near_duplicates, default_profile_path, read_profile,
                            tail_mix_contexts)

from .cost_model import AnalyticCostModel, DecodeCost, unscaled_microbatch_tail_s

KINDS = ("auto", "analytic", "calibrated")
CONTEXT_KNOTS = [0] + [2 ** i for i in range(4, 18)]  # 16 .. 131072: where a single-context row is stretched


class _Line:
    """y(x) through measured knots; outside them the end segment's slope, clamped >= 0 (or held flat); y never
    below `floor` (0: a time; None: a signed difference, such as an engine overhead)."""
    __slots__ = ("xs", "ys", "slopes", "lo", "hi", "x0", "x1", "y0", "y1", "floor")

    def __init__(self, xs: Sequence[float], ys: Sequence[float], hold: bool = False, floor: float | None = 0.0):
        self.xs, self.ys, self.floor = list(xs), list(ys), floor
        n = len(self.xs)
        self.slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(n - 1)] or [0.0]
        self.lo = 0.0 if hold else max(0.0, self.slopes[0])
        self.hi = 0.0 if hold else max(0.0, self.slopes[-1])
        self.x0, self.x1, self.y0, self.y1 = self.xs[0], self.xs[-1], self.ys[0], self.ys[-1]

    def __call__(self, x: float) -> float:
        if x <= self.x0:
            y = self.y0 - (self.x0 - x) * self.lo
        elif x >= self.x1:
            y = self.y1 + (x - self.x1) * self.hi
        else:
            i = bisect_right(self.xs, x) - 1
            y = self.ys[i] + (x - self.xs[i]) * self.slopes[i]
        return y if self.floor is None or y > self.floor else self.floor


class _Surface:
    """v(x, y) from (x, y, v) points: a _Line in y per measured x, linear in x between them (mean of repeats);
    never below `floor` (as _Line)."""

    def __init__(self, points, hold: bool = False, floor: float | None = 0.0):
        by_x: dict = defaultdict(lambda: defaultdict(list))
        for x, y, v in points:
            by_x[float(x)][float(y)].append(float(v))
        self.xs = sorted(by_x)
        self.lines = [_Line(sorted(by_x[x]), [sum(v) / len(v) for _, v in sorted(by_x[x].items())], hold, floor)
                      for x in self.xs]
        self.hold, self.floor = hold, floor
        self.n = len(self.xs)
        self._cache: dict[float, _Line] = {}
        if not hold:
            self._borrow_slopes()

    def _borrow_slopes(self) -> None:
        """A batch measured at one context takes the context slope of the nearest batch measured at
        several, scaled by the batch ratio (the KV read grows as batch x context): real.profile can
        fit only short contexts in the KV cache at its largest batches."""
        multi = [i for i, ln in enumerate(self.lines) if len(ln.xs) > 1]
        for i, ln in enumerate(self.lines):
            if len(ln.xs) == 1 and multi:
                j = min(multi, key=lambda k: abs(math.log(self.xs[k] / self.xs[i])))  # batches are >= 1
                ref = self.lines[j]
                slope = (ref.y1 - ref.y0) / (ref.x1 - ref.x0) * self.xs[i] / self.xs[j]
                self.lines[i] = _Line([ln.x0, ln.x0 + 1.0], [ln.y0, ln.y0 + slope], floor=self.floor)

    def _bracket(self, x: float) -> int:
        xs = self.xs
        if x <= xs[0]:
            return 0
        if x >= xs[-1]:
            return self.n - 2
        return bisect_right(xs, x) - 1

    def __call__(self, x: float, y: float) -> float:
        if self.n == 1:
            return self.lines[0](y)
        i = self._bracket(x)
        x0, x1 = self.xs[i], self.xs[i + 1]
        v0, v1 = self.lines[i](y), self.lines[i + 1](y)
        if x < x0:
            v = v0 if self.hold else v0 - (x0 - x) * max(0.0, (v1 - v0) / (x1 - x0))
        elif x > x1:
            v = v1 if self.hold else v1 + (x - x1) * max(0.0, (v1 - v0) / (x1 - x0))
        else:
            v = v0 + (x - x0) / (x1 - x0) * (v1 - v0)
        return v if self.floor is None or v > self.floor else self.floor

    def knots(self, x: float) -> list[float]:
        if self.n == 1:
            return self.lines[0].xs
        i = self._bracket(x)
        return sorted(set(self.lines[i].xs) | set(self.lines[i + 1].xs))

    def line(self, x: float) -> _Line:
        """The y-line at x (cached): exact where x was measured, the blend of its neighbours between."""
        ln = self._cache.get(x)
        if ln is None:
            ks = self.knots(x)
            ln = self._cache[x] = _Line(ks, [self(x, k) for k in ks], self.hold, self.floor)
        return ln

    def span(self) -> str:
        ys = sorted({y for ln in self.lines for y in ln.xs})
        return f"{_g(self.xs[0])}..{_g(self.xs[-1])} x {_g(ys[0])}..{_g(ys[-1])}"


class _Splits:
    """One _Surface per measured attn_sms, linear in attn_sms between two of them, nearest outside."""

    def __init__(self, rows, hold: bool = False):
        groups: dict = defaultdict(list)
        for a, x, y, v in rows:
            groups[int(a)].append((x, y, v))
        self.keys = sorted(groups)
        self.surfaces = [_Surface(groups[a], hold) for a in self.keys]
        self._cache: dict = {}
        xs = [x for g in groups.values() for x, _, _ in g]
        ys = [y for g in groups.values() for _, y, _ in g]
        self.span = ((min(xs), max(xs)), (min(ys), max(ys)))  # the rows' batches and contexts

    def _pick(self, a: int) -> tuple[int, float]:
        """(index of the lower surface, weight of the upper one)."""
        keys = self.keys
        if a <= keys[0] or len(keys) == 1:
            return 0, 0.0
        if a >= keys[-1]:
            return len(keys) - 1, 0.0
        i = bisect_right(keys, a) - 1
        return i, (a - keys[i]) / (keys[i + 1] - keys[i])

    def __call__(self, a: int, x: float, y: float) -> float:
        i, w = self._pick(a)
        v = self.surfaces[i](x, y)
        return v if w == 0.0 else v + w * (self.surfaces[i + 1](x, y) - v)

    def line(self, a: int, x: float) -> _Line:
        key = (a, x)
        ln = self._cache.get(key)
        if ln is None:
            i, w = self._pick(a)
            ks = self.surfaces[i].knots(x) if w == 0.0 else sorted(
                set(self.surfaces[i].knots(x)) | set(self.surfaces[i + 1].knots(x)))
            ln = self._cache[key] = _Line(ks, [self(a, x, k) for k in ks])
        return ln


def _g(v: float) -> str:
    return f"{v:g}"


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int):
    return read_profile(path)


class CalibratedCostModel:
    """Measured profile, interpolated; the analytic model for what it lacks. See the module doc."""

    def __init__(self, profile, hardware: HardwareSpec | str, model: ModelSpec | str,
                 base: AnalyticCostModel | None = None, meta: dict | None = None):
        self.hardware = hardware_spec(hardware) if isinstance(hardware, str) else hardware
        self.model = model_spec(model) if isinstance(model, str) else model
        self.base = base or AnalyticCostModel(self.hardware, self.model)
        self.name = "calibrated"
        if isinstance(profile, (str, Path)):
            self.profile_path = str(profile)
            p = Path(profile)
            if not p.is_file():
                raise ProfileError(f"{p}: no such profile")
            df, file_meta = _read(str(p.resolve()), p.stat().st_mtime_ns)
            meta = {**file_meta, **(meta or {})}
        else:
            self.profile_path, df = None, profile
        self.meta = meta or {}
        self._check_meta()
        self.layers = self.model.num_layers
        self.sources: dict[str, str] = {}
        self.fallbacks: list[str] = []
        df, folded = collapse_near_duplicates(df)
        if folded:
            self._note("profile", f"{folded} row(s) within 1% in context of another of their shape folded into it "
                                  "(their median: a slope between them would be noise)")
        self._mixed = None  # forward_s's colocated-step correction, once _build_mixed has the rows
        rows = {op: df[df["op"] == op] for op in OPS}
        self._build_decode_graphs()
        self._build_decode(rows)
        self._build_pipeline(rows)
        self._build_prefill(rows["prefill"])
        self._build_transfer(rows["transfer"])
        self._build_copy(rows["decode_copy"])
        self._seq: dict[int, tuple] = {}
        self._shares: dict[tuple, tuple[float, float]] = {}
        self._build_decode_tail(rows["decode_program"])
        self._build_decode_tail_scale(rows["decode_tail"])
        self._build_prefill_gpu_decode(rows["decode_prefill_gpu"])  # before the engine rows: single's read it
        self._build_engine_overhead(rows)
        self._build_mixed(rows["mixed"])  # last: it divides by the composed step the rest builds

    def _check_meta(self) -> None:
        where = self.profile_path or "profile"
        for key, want in (("hardware", self.hardware.name), ("model", self.model.name)):
            got = self.meta.get(key)
            if got is not None and got != want:
                raise ProfileError(f"{where}: measured for {key} {got!r}, but this run simulates {want!r}")

    # ---- building ------------------------------------------------------------------------------
    def _build_decode(self, rows) -> None:
        full = int(self.meta.get("sms") or self.hardware.sms)
        d, h = rows["decode"], rows["host"]
        self._decode = _surface(d)
        self._host = _Line(*zip(*sorted(_means(zip(h["batch"], h["seconds"])).items()))) if len(h) else None
        a = rows["attn"][rows["attn"]["attn_sms"].isin((0, full))]
        f = rows["ffn"][rows["ffn"]["ffn_sms"].isin((0, full))]
        self._attn, self._ffn, self._layer_seq = _surface(a), _surface(f), _surface(rows["seq"])
        self._busy_measured = self._attn is not None and self._ffn is not None
        if self._decode is None:
            self._note("decode", "analytic (no decode rows)", fallback=True)
        else:
            busy = ("busy from whole-GPU attn/ffn rows" if self._busy_measured
                    else "busy: analytic attention/FFN share (no whole-GPU attn and ffn rows)")
            self._note("decode", f"profile: {len(d)} rows, batch x context {self._decode.span()}; {busy}")
        if len(h):
            self._note("host", f"profile: {len(h)} rows, informational (staging + launch, inside the decode rows)")
        parts = len(rows["attn"]) + len(rows["ffn"]) - len(a) - len(f)
        if parts:
            self._note("attn/ffn", f"{parts} rows on partitions read but not used (pipeline and pair rows are)")

    def _build_decode_graphs(self) -> None:
        graphs = self.meta.get("decode_graphs") or {}
        self._graph_batches = sorted(int(b) for b in graphs.get("buckets") or ())
        if self._graph_batches:
            self._note("graphs", f"decode batches padded to the engine's CUDA-graph buckets {self._graph_batches}: "
                                 "the attention kernel's context splits follow the padded batch")

    def graph_batch(self, batch_size: int) -> int:
        """The batch a decode step of `batch_size` sequences runs at: the engine replays the smallest captured
        graph that fits (real/graphs.py); unpadded without `decode_graphs` metadata or beyond the largest
        bucket (eager). The paged-decode kernel's grid, and so its context splits (decode_tail_s), follow
        this batch. The step itself is read at its own batch: the padding rows attend over nothing and
        skip the LM head and sampling, and their matmul rows cost < 1% in the analytic model (qwen3-0.6b,
        H200: batch 65 at 1,024-token contexts 3.845 ms, padded to 96 3.871 ms). Reading the decode rows at
        the bucket with the same KV (as if the padding rows were sequences) charged pd's steps 1.3% more
        on 2x H200 (session 15's runs: 0.98-1.03 of real became 1.00-1.04)."""
        i = bisect_right(self._graph_batches, batch_size - 1)
        return self._graph_batches[i] if i < len(self._graph_batches) else batch_size

    def host_s(self, batch_size: int) -> float | None:
        """Measured CPU staging + launch time of a decode step (None without host rows)."""
        return self._host(batch_size) if self._host is not None else None

    def _build_pipeline(self, rows) -> None:
        p = rows["pipeline"]
        self._pipe = {int(m): _Splits(zip(g["attn_sms"], g["batch"], g["context"], g["seconds"]))
                      for m, g in p.groupby("microbatches")} if len(p) else {}
        q = rows["pair"]
        self._pair = _Splits(zip(q["attn_sms"], q["batch"], q["context"], q["seconds"])) if len(q) else None
        self._pair_ok = (self._pair is not None and self._decode is not None
                         and (self._layer_seq is not None or self._busy_measured))
        if self._pipe:
            ms = ", ".join(f"m={m} at attn_sms {s.keys}" for m, s in sorted(self._pipe.items()))
            self._note("pipeline", f"profile: {len(p)} rows, {ms}; other m: "
                       + ("pair rows" if self._pair_ok else "analytic ratio"))
        elif self._pair_ok:
            self._note("pipeline", f"pair rows ({len(q)}, attn_sms {self._pair.keys}) x calibrated sequential "
                                   "step (no pipeline rows)")
        else:
            self._note("pipeline", "analytic ratio pipelined/sequential x calibrated sequential step "
                                   "(no pipeline rows; no pair + whole-GPU seq or attn/ffn + decode rows)",
                       fallback=True)

    def _build_prefill(self, p) -> None:
        graphs = self.meta.get("prefill_graphs") or {}
        self._buckets = sorted(int(b) for b in graphs.get("buckets") or ())
        self._bucket_seqs = int(graphs.get("max_seqs") or 0)
        self._bucket_paged = bool(graphs.get("paged"))
        self._pad_line = None
        if not len(p):
            self._prefill = None
            self._note("prefill", "analytic (no prefill rows)", fallback=True)
            return
        base, b0 = self.base, int(p["batch"].min())
        self._pad_line, pad_note = self._build_pad_line(p) if self._buckets else (None, "")
        ratios = []
        for b, t, c, s in zip(p["batch"], p["tokens"], p["context"], p["seconds"]):
            b, t, c = int(b), int(t), int(c)
            chunks = [(t // b + (1 if j < t % b else 0), c) for j in range(b)]
            pad = self._pad(chunks)
            if pad and self._pad_line is not None:  # the row less its padding's measured cost, at its own size
                s -= max(0.0, self._pad_line(t + pad) - self._pad_line(t))
                ratios.append((b, t, c, s / base.forward_s(chunks)))
            else:  # a padded batch sits at its bucket's size on the token axis
                ratios.append((b, t + pad, c, s / base.forward_s(chunks, pad_tokens=pad)))
        self._prefill = _Surface([(t, c, r) for b, t, c, r in ratios if b == b0], hold=True)
        packed = [(b, t, r / self._prefill(t, c)) for b, t, c, r in ratios if b > b0]
        self._packed = _Surface(packed + [(b0, 0, 1.0)], hold=True) if packed else None
        ctxs = sorted(set(p["context"]))
        prefix = "interpolated" if len(ctxs) > 1 else f"analytic term (only context {ctxs[0]} measured)"
        more = f"; x a factor over {len(packed)} rows of more sequences" if packed else ""
        pad = (f"; padded to the engine's graph token buckets {self._buckets} (<= {self._bucket_seqs} sequences"
               f"{'' if self._bucket_paged else ', no cached prefix'})") if self._buckets else ""
        if self._pad_line is not None:
            pad += f"; padding rows at the measured attention-free cost ({pad_note})"
        self._note("prefill", f"profile: {len(p)} rows, {b0} seq(s) over tokens x context {self._prefill.span()} "
                              f"as a ratio to the analytic forward{more}; prefix attention: {prefix}{pad}")

    def _build_pad_line(self, p) -> "tuple[_Line | None, str]":
        """What a graph bucket's padding rows cost, from the rows alone: M(T), a step of T tokens without
        attention, at each bucket. Where one sequence of T tokens and T tokens packed in k equal sequences were
        both measured (context 0), the two differ only by attention, a per causal (query, key) pair at that T:
        m1 = M + a T^2/2, mk = M + a k (T/k)^2/2. Every context-0 row then gives M at its bucket (measured -
        a x its pairs, `a` held beyond the solved sizes), linear in T between buckets and flat below the first
        (its own rows are padded). Padding rows cost M(tokens + pad) - M(tokens).
        Why not the 1-sequence ratio at the bucket's size: that row's attention (an 8,192-token sequence)
        sets the ratio, so a 4,113-token prompt in the 8,192 bucket read 25.7 ms against 31.3 ms served
        on 2x H100 (this charge: 31.0 ms). (None, "") without a solvable pair of rows; else the line and a
        note of the per-pair attention costs solved."""
        rows = [(int(b), int(t), float(s)) for b, t, c, s in zip(p["batch"], p["tokens"], p["context"], p["seconds"])
                if int(c) == 0 and int(t) % int(b) == 0 and int(b) <= self._bucket_seqs]
        one = {t: s for b, t, s in rows if b == 1}
        solved = {}
        for b, t, s in rows:
            if b > 1 and t in one:
                pairs_gap = t * t / 2 - b * (t / b) ** 2 / 2
                a = (one[t] - s) / pairs_gap
                if a > 0:
                    solved[t] = a
        if not solved:
            return None, ""
        a_of = _Line(*zip(*sorted(solved.items())), hold=True)
        at_bucket: dict = defaultdict(list)
        for b, t, s in rows:
            m = s - a_of(t) * b * (t / b) ** 2 / 2
            if m > 0:
                at_bucket[t + self._pad([(t // b, 0)] * b)].append(m)
        knots = sorted((bucket, sum(v) / len(v)) for bucket, v in at_bucket.items())
        note = (f"attention {', '.join(f'{a * 1e12:.2f} ps' for _, a in sorted(solved.items()))} per pair at "
                f"{', '.join(str(t) for t in sorted(solved))} tokens")
        return (_Line(*zip(*knots), hold=True) if len(knots) >= 2 else None), note  # flat below the first bucket

    def _pad(self, chunks) -> int:
        """Padding rows the real engine's prefill CUDA graph adds to this batch: up to the smallest token
        bucket that holds it, where one does (the profile's metadata lists the buckets: a 1,100-token prompt
        replays the 2,048-token graph, 1.6x the cost of 1,024 tokens on H100); 0 for an eager prefill."""
        if not self._buckets or len(chunks) > self._bucket_seqs or not chunks:
            return 0
        if not self._bucket_paged and any(ctx for _, ctx in chunks):
            return 0
        tokens = sum(n for n, _ in chunks)
        i = bisect_right(self._buckets, tokens - 1)
        return self._buckets[i] - tokens if i < len(self._buckets) else 0

    def _build_transfer(self, t) -> None:
        lat, bw = self.hardware.nvlink_latency_s, self.hardware.nvlink_bytes_per_s
        self._lat, self._s_per_byte = lat, 1.0 / bw
        if not len(t):
            self._note("transfer", f"analytic ({lat * 1e6:.0f} us + bytes / {bw / 1e9:.0f} GB/s; no transfer rows)",
                       fallback=True)
            return
        x, y = [float(v) for v in t["bytes"]], [float(v) for v in t["seconds"]]
        n, sx, sy = len(x), sum(x), sum(y)
        sxx, sxy = sum(v * v for v in x), sum(a * b for a, b in zip(x, y))
        den = n * sxx - sx * sx
        if den > 0:  # two or more distinct sizes: least squares
            k = (n * sxy - sx * sy) / den
            c = (sy - k * sx) / n
            if c < 0:  # through the origin instead
                k, c = sxy / sxx, 0.0
        elif sx > 0:  # one size: keep the analytic latency, the rest is bandwidth
            c = lat if sy / n > lat else 0.0
            k = (sy / n - c) / (sx / n)
        else:  # only empty copies: latency measured, bandwidth analytic
            c, k = sy / n, self._s_per_byte
        if k <= 0:
            self._note("transfer", f"analytic ({len(t)} transfer rows do not grow with bytes)", fallback=True)
            return
        self._lat, self._s_per_byte = c, k
        self._note("transfer", f"fit of {len(t)} rows: {c * 1e6:.1f} us + bytes / {1e-9 / k:.0f} GB/s")

    def _build_copy(self, rows) -> None:
        """Seconds a copy of one byte into the decode GPU adds to the decode steps it overlaps, per decode batch:
        a least-squares line through the origin over the decode_copy rows of each batch (clamped >= 0), linear
        in batch between them and held beyond. Without rows: 0 (the analytic model has no such term)."""
        self._copy = None
        if not len(rows):
            self._note("copy", "none (no decode_copy rows): a KV copy costs the decode GPU nothing")
            return
        per_batch = []
        for b, g in rows.groupby("batch"):
            x, y = g["bytes"].to_numpy(dtype=float), g["seconds"].to_numpy(dtype=float)
            sxx = float(x @ x)
            per_batch.append((float(b), max(0.0, float(x @ y) / sxx) if sxx > 0 else 0.0))
        self._copy = _Line(*zip(*per_batch), hold=True)
        at = ", ".join(f"batch {b:.0f}: {k * 1e9 * (1 << 20):.1f} us/MiB" for b, k in per_batch)
        self._note("copy", f"fit of {len(rows)} decode_copy rows, added to the overlapped decode steps: {at}")

    def _build_mixed(self, rows) -> None:
        """mixed rows / the composition forward_s makes of the prefill and decode rows at the same shape, by decode
        batch (x) and chunk tokens (y), linear between rows and held flat beyond them: the runner runs a colocated
        step as two passes and one LM head, and the two isolated rows each also carry a step's host staging and
        token read-back, which the second pass's staging overlaps with the first pass on the GPU. Without rows:
        the composition alone."""
        if not len(rows):
            self._note("mixed", "composed (no mixed rows): prefill + decode step - the analytic LM head and "
                                "sampling they share")
            return
        pts = []
        for b, t, c, sec in zip(rows["batch"], rows["tokens"], rows["context"], rows["seconds"]):
            pts.append((float(b), float(t), float(sec) / self.forward_s([(int(t), 0)], int(b), int(b) * int(c))))
        self._mixed = _Surface(pts, hold=True)
        ratios = ", ".join(f"{b:.0f} x {t:.0f}: {r:.3f}" for b, t, r in pts)
        self._note("mixed", f"composed x mixed / composed at {len(pts)} mixed rows (decodes x chunk tokens: "
                            f"{ratios}), held beyond them")

    def _build_prefill_gpu_decode(self, rows) -> None:
        """GPU0's decode speed over the decode GPU's, by batch: decode_prefill_gpu rows / the decode rows at the same
        shape, linear in batch and held beyond. real.profile times the decode side on GPU1, where pd, pipeline
        and adaptive decode; single and dp decode on GPU0 too, and two GPUs of one node measured 4-10% apart
        (bench/results/gpu_ab_NVIDIA_H200.json). Without rows (one GPU timed everything): 1."""
        self._gpu0_decode = None
        if not len(rows):
            return
        pts = sorted(_means((float(b), float(sec) / self.decode_step(int(b), int(b) * int(c)).step_s)
                            for b, c, sec in zip(rows["batch"], rows["context"], rows["seconds"])).items())
        self._gpu0_decode = _Line(*zip(*pts), hold=True)
        self._note("gpu0_decode", "decode steps on GPU0 (single, dp) x GPU0 / GPU1 from decode_prefill_gpu rows: "
                                  + ", ".join(f"batch {b:.0f}: {r:.3f}" for b, r in pts))

    def decode_device_factor(self, device: str, batch_size: int) -> float:
        """A decode step on `device` over the decode rows' (which the decode GPU timed): GPU0's measured ratio."""
        if device != "gpu0" or self._gpu0_decode is None:
            return 1.0
        return self._gpu0_decode(float(batch_size))

    def _build_decode_tail(self, rows) -> None:
        """One unsplit decode program's time per token per layer: the slope of the decode_program rows over
        context (one row: through the origin; in the H200 split sweep the unsplit kernel took 25.6 us for
        1024-token contexts and 48.6 us with a 1,923-token longest one, an intercept near 0)."""
        self._program_s_per_token = 0.0
        if not len(rows):
            self._note("tail", "none (no decode_program rows): every context mix costs like a uniform one")
            return
        ctx, sec = rows["context"].to_numpy(dtype=float), rows["seconds"].to_numpy(dtype=float)
        slope = float(np.polyfit(ctx, sec, 1)[0]) if len(set(ctx)) > 1 else float(sec.mean() / ctx.mean())
        if slope <= 0:
            self._note("tail", f"none ({len(rows)} decode_program rows do not grow with context)", fallback=True)
            return
        self._program_s_per_token = slope
        self._note("tail", f"{len(rows)} decode_program rows: one program streams 1k tokens in "
                           f"{slope * 1e9:.1f} us per layer")

    def decode_tail_s(self, batch_size: int, kv_tokens: int, max_context: int,
                      padded_batch: int | None = None) -> float:
        """What a batch of mixed context lengths adds to a decode step over a uniform batch with the same KV.

        Why: the paged-decode kernel runs one program per (sequence, kv head, context split) and splits
        only small batches (policies.specs.decode_context_splits). At batch >= ~32 a long sequence's
        programs stream its whole context alone, at one program's rate, after the others finished: in
        the 2x H200 fidelity runs (qwen3-0.6b, Azure conv) decode steps over the uniform-context profile
        grew with the batch's longest context, +0.5 ms at <= 2k tokens to +4.5..5.2 ms at 6-9k, about one
        program's time for (longest - mean context) per layer (bench/fidelity_diagnose.py). Modelled as
        layers x that time / splits; the decode rows measured uniform contexts, so they carry none of it.
        `padded_batch`: the rows of the kernel's grid where they are not the batch's own graph bucket (a pipelined
        micro-batch runs half its step's bucket: sim/cost_model.py unscaled_microbatch_tail_s)."""
        if self._program_s_per_token <= 0 or batch_size <= 0:
            return 0.0
        excess = max_context - kv_tokens / batch_size
        if excess <= 0:
            return 0.0
        sms = int(self.meta.get("sms") or self.hardware.sms)
        rows = padded_batch if padded_batch is not None else self.graph_batch(batch_size)  # the kernel's grid
        splits = decode_context_splits(rows * self.model.num_kv_heads, sms)
        return self.layers * self._program_s_per_token * excess / splits

    def _build_decode_tail_scale(self, rows) -> None:
        """decode_tail_scale from decode_tail rows: at each measured (split, batch, long context), the measured tail
        over the one decode_tail_s composes for the same contexts (unscaled_microbatch_tail_s), over (batch, excess:
        longest - mean context) per attention partition (0: sequential), held flat past the measured ones, never
        below 0. Why: decode_tail_s is one program streaming the longest context's excess alone at one program's
        rate after the others finish, on the whole GPU. On one H200 (bench/results/pipeline_tail_ab_longs_NVIDIA_
        H200.json) the sequential tail read 0.83-1.11 of it, and the pipelined one grows slower with the excess
        than modelled: on 64:68 at batch 128, 1.16 / 0.93 / 0.84 of it with every 8th sequence 3,072 / 5,120 /
        8,192 tokens (the rest 1,024). Held at one scale, the 8,192-token rows took the conv runs' pipelined
        TPOT from -3..+4% to -9..-14% (their steps' excess is mostly 2-4k), where the held-out runs' TPOT p99
        came from +17..+23% to +5..+11%. decode_tail_scale reads the pipelined surface against the sequential."""
        self._tail_seq: _Surface | None = None
        self._tail_pipe: _Splits | None = None
        if not len(rows) or self._program_s_per_token <= 0:
            if len(rows):
                self._note("tail scale", "none: decode_tail rows without decode_program rows to read them against",
                           fallback=True)
            return
        seq, pipe, text = [], [], defaultdict(list)
        for b, ctx, a, m, sec in zip(rows["batch"], rows["context"], rows["attn_sms"], rows["microbatches"],
                                     rows["seconds"]):
            contexts = tail_mix_contexts(int(b), int(ctx))  # kv_len values, as fake_decode_batch sets them
            model = unscaled_microbatch_tail_s(self, contexts, int(m))
            if model <= 0:
                continue
            ratio, excess = max(0.0, float(sec)) / model, max(contexts) - sum(contexts) / len(contexts)
            (seq.append((b, excess, ratio)) if a == 0 else pipe.append((a, b, excess, ratio)))
            text[int(a)].append(f"{ratio:.2f}@{int(b)}x{int(ctx)}")
        self._tail_seq = _Surface(seq, hold=True) if seq else None
        self._tail_pipe = _Splits(pipe, hold=True) if pipe else None
        self._note("tail scale", f"{len(rows)} decode_tail rows (pipelined tails scaled by pipelined / sequential), "
                                 "measured/modelled tail at batch x long context: "
                   + "; ".join(f"{'sequential' if a == 0 else f'attn {a} SMs'} " + " ".join(v)
                               for a, v in sorted(text.items())))

    def decode_tail_scale(self, batch_size: int, excess: float, split: tuple[int, int] | None = None) -> float:
        """What pipelining on `split` does to the modelled decode tail of a step of batch_size sequences whose longest
        context is `excess` tokens over their mean: the pipelined rows' measured/modelled tail over the sequential
        rows' at the same batch and excess (_build_decode_tail_scale; linear in attention SMs between measured
        partitions, the nearest one's past them). 1 for a sequential step, and without pipelined rows.
        Why relative: unscaled, the sequential tail model put session 17's served conv pd steps at 0.999-1.009 of
        the real ones (totals per batch bin, 8-127 sequences), while the rows' two-length mix read it 0.83-1.11 (a
        served batch's spread of lengths leaves more than one sequence streaming late); scaled by that too, pd's
        conv TPOT fell 3.4-3.9 points on every machine. What the rows show is the partition's effect, the same
        mix both ways. Over 13 H200 run sets this beat both the absolute pipelined scale and no scale
        (bench/results/decode_tail_scale_NVIDIA_H200_session18.json). Not validated on H100: one H100's rows
        (sequential 0.53 at 128 x 8,192) read against session 9's H100 profile put pipeline's conv TPOT p99 at
        +90% (bench/results/decode_tail_scale_NVIDIA_H100_80GB_HBM3_session18.json); the committed H100 profile
        has no decode_tail rows."""
        if split is None or self._tail_pipe is None:
            return 1.0
        pipe = self._tail_pipe(split[0], batch_size, excess)
        if self._tail_seq is None:
            return pipe
        seq = self._tail_seq(batch_size, excess)
        return pipe / seq if seq > 0 else 1.0

    def _build_engine_overhead(self, rows) -> None:
        from traces.profile import ENGINE_ISOLATED_OPS, ENGINE_OPS

        from .overhead import EngineOverhead

        # the engine rows decode prompts spread over context x [1 - s, 1 + s]: their own tail is the kernel's,
        # not the engine's (the longest runs about s x context over the mean)
        s = float((self.meta.get("engine_rows") or {}).get("prompt_spread", 0.0))
        s1 = float((self.meta.get("engine_rows_single") or {}).get("prompt_spread", s))

        def isolated(device: str, spread: float):  # the isolated step on `device` + the rows' own tail
            return lambda b, kv: (self.decode_device_factor(device, b) * self.decode_step(b, kv).step_s
                                  + self.decode_tail_s(b, kv, kv / b * (1 + spread)))

        self.overhead = EngineOverhead({op: rows[op] for op in ENGINE_OPS + ENGINE_ISOLATED_OPS}, isolated("gpu1", s),
                                       self.forward_s, _Surface, isolated("gpu0", s1))
        self._note("engine", self.overhead.describe())  # not an analytic fallback: the analytic model has none

    @property
    def overhead_depends_on_other_gpu(self) -> bool:
        return self.overhead.depends_on_other_gpu

    def engine_overhead_s(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                          colocated: bool = False) -> float:
        """What the real engine's body adds to a step (sim/overhead.py): stage "decode" (batch_size
        sequences reading `tokens` KV tokens) or "prefill" (batch_size sequences, `tokens` new tokens)."""
        if stage == "decode":
            return self.overhead.decode_s(batch_size, tokens, other_busy, colocated)
        return self.overhead.prefill_s(batch_size, tokens, other_busy, colocated)

    @property
    def has_step_spread(self) -> bool:
        return self.overhead.has_spread

    def engine_step_spread(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                           colocated: bool = False):
        """The measured spread of an engine step's time around its mean (sim/variability.StepSpread), same
        arguments as engine_overhead_s; None where the profile has no spread columns."""
        if stage == "decode":
            return self.overhead.decode_spread(batch_size, tokens, other_busy, colocated)
        return self.overhead.prefill_spread(batch_size, tokens, other_busy, colocated)

    def _note(self, op: str, text: str, fallback: bool = False) -> None:
        self.sources[op] = text
        if fallback:
            self.fallbacks.append(op)

    def describe(self) -> str:
        m = self.meta
        head = f"calibrated cost model from {self.profile_path or 'a DataFrame'}"
        if m:
            head += f" ({m.get('gpu', '?')}, {m.get('date', '?')}, torch {m.get('torch', '?')})"
        lines = [head] + [f"  {op:9s} {text}" for op, text in self.sources.items()]
        lines.append("  falls back to the analytic model for: " + (", ".join(self.fallbacks) or "nothing"))
        return "\n".join(lines)

    # ---- the interface -------------------------------------------------------------------------
    def _seq_lines(self, b: int) -> tuple:
        """(decode line, attn line, ffn line) for batch b, over context; built once per b."""
        got = self._seq.get(b)
        if got is None:
            got = self._seq[b] = (self._decode.line(b) if self._decode is not None else None,
                                  self._stretched(self._attn, "attn", b) if self._busy_measured else None,
                                  self._stretched(self._ffn, "ffn", b) if self._busy_measured else None)
        return got

    def _stretched(self, surface: _Surface, stage: str, b: int) -> _Line:
        """A layer surface's context line at b; measured at one context only, it follows the analytic
        stage's shape along context (attention grows with the KV it reads)."""
        ctxs = {y for ln in surface.lines for y in ln.xs}
        if len(ctxs) > 1:
            return surface.line(b)
        c0 = ctxs.pop()
        ref = self.base.stage_s(stage, b, b * c0)
        knots = sorted(set(CONTEXT_KNOTS) | {c0})
        return _Line(knots, [surface(b, c0) * self.base.stage_s(stage, b, b * k) / ref for k in knots])

    def _seq_step_s(self, b: int, kv: float) -> float:
        """The sequential step from decode rows, or the analytic one."""
        line = self._seq_lines(b)[0]
        return line(kv / b) if line is not None else self.base.decode_step(b, kv).step_s

    def decode_step(self, batch_size: int, kv_tokens: int, split: tuple[int, int] | None = None,
                    microbatches: int = 1) -> DecodeCost:
        b = batch_size
        if b <= 0:
            return DecodeCost(0.0, 0.0, 0.0)
        if split is not None:
            return self._split_step(b, kv_tokens, split, microbatches)
        line, aline, fline = self._seq_lines(b)
        if line is None:
            return self.base.decode_step(b, kv_tokens)
        ctx = kv_tokens / b
        step = line(ctx)
        if aline is not None:
            attn, ffn = self.layers * aline(ctx), self.layers * fline(ctx)
            if attn + ffn > step:  # per-layer timings carry launch/sync costs a graphed step does not
                k = step / (attn + ffn)
                attn, ffn = attn * k, ffn * k
            return DecodeCost(step, attn, ffn)
        a = self.base.decode_step(b, kv_tokens)
        scale = step / a.step_s
        return DecodeCost(step, a.attn_busy_s * scale, a.ffn_busy_s * scale)

    def _split_step(self, b: int, kv: int, split: tuple[int, int], microbatches: int) -> DecodeCost:
        m = microbatches if microbatches < b else b
        if m < 1:
            m = 1
        pipe = self._pipe.get(m)
        step = self._pipe_step_s(pipe, b, kv, split) if pipe is not None else self._split_fallback_s(b, kv, split, m)
        key = (split, m, b, int(kv / b).bit_length())  # busy shares per power-of-two context bucket
        shares = self._shares.get(key)
        if shares is None:
            a = self.base.decode_step(b, kv, split, m)
            shares = self._shares[key] = (a.attn_busy_s / a.step_s, a.ffn_busy_s / a.step_s)
        return DecodeCost(step, step * shares[0], step * shares[1])

    def _pipe_step_s(self, pipe: "_Splits", b: int, kv: float, split: tuple[int, int]) -> float:
        """The pipelined step from its rows; outside their batches and contexts, their ratio to the sequential
        step at the nearest measured shape, times the sequential step here. A pipelined step does not shrink
        with the batch as the sequential one does (two micro-batches, twice the kernels, each on part of the
        GPU): extrapolated on its own below the rows' smallest batch (16) it came out 1.0-1.1x the sequential
        step at batch 4-8 with 2-3k-token contexts, and the simulated adaptive settled on splits there, where
        the real pipelined steps took 1.35x (2x H200, held-out workload). Profiles since session 20 time pipelined
        rows from batch 2 (real/profile.py PIPELINE_SMALL_BATCHES), so this ratio now serves older profiles."""
        ctx = kv / b
        (lo, hi), (clo, chi) = pipe.span
        bb, cc = min(max(b, lo), hi), min(max(ctx, clo), chi)
        if bb == b and cc == ctx:
            return pipe.line(split[0], b)(ctx)
        near = pipe.line(split[0], bb)(cc)
        return near / self._seq_step_s(int(bb), bb * cc) * self._seq_step_s(b, kv)

    def _split_fallback_s(self, b: int, kv: int, split: tuple[int, int], m: int) -> float:
        """No pipeline rows for m: pair rows, else the analytic ratio, on the calibrated sequential step."""
        base = self.base
        seq, seq_a = self._seq_step_s(b, kv), base.decode_step(b, kv).step_s
        if m >= 2 and self._pair_ok:
            ctx = kv / b
            layer = self._layer_seq(b, ctx) if self._layer_seq is not None else self._attn(b, ctx) + self._ffn(b, ctx)
            ratio = m * self._pair(split[0], b / m, ctx) / layer if layer > 0 else 1.0
            lm = seq * base._lm_s(b) / seq_a  # LM head + sampling: not pipelined
            return lm + (seq - lm) * ratio
        return seq * base.decode_step(b, kv, split, m).step_s / seq_a

    def forward_s(self, chunks: Sequence[tuple[int, int]], decode_batch: int = 0, decode_kv_tokens: int = 0) -> float:
        """Prefill chunks (new_tokens, context_before) plus a decode batch in one step on one GPU."""
        b = decode_batch
        if not chunks:
            return self.decode_step(b, decode_kv_tokens).step_s
        base = self.base
        pad = self._pad(chunks) if self._prefill is not None else 0
        measured_pad = pad > 0 and self._pad_line is not None
        t = base.forward_s(chunks, pad_tokens=0 if measured_pad else pad)
        if self._prefill is not None:
            tokens = prefix = 0
            for new, ctx in chunks:
                tokens += new
                prefix += new * ctx
            if tokens > 0:
                at = tokens if measured_pad else tokens + pad  # the token axis the batch is read at
                t *= self._prefill(at, prefix / tokens)
                if self._packed is not None:
                    t *= self._packed(len(chunks), at)
                if measured_pad:  # the batch itself, then its padding rows at their measured cost
                    t += max(0.0, self._pad_line(tokens + pad) - self._pad_line(tokens))
        if b > 0:  # the engine's decode pass, then one LM head + sampling for both (real/runner.py)
            n = len(chunks)
            t += self.decode_step(b, decode_kv_tokens).step_s - (base._lm_s(n) + base._lm_s(b) - base._lm_s(n + b))
            if self._mixed is not None:  # as measured whole (mixed rows)
                t *= self._mixed(b, sum(c for c, _ in chunks))
        return t

    def transfer_s(self, kv_bytes: int) -> float:
        return self._lat + kv_bytes * self._s_per_byte  # 0 bytes: a failed attempt still costs the latency

    def copy_interference_s(self, kv_bytes: int, batch_size: int) -> float:
        """What one KV copy of kv_bytes adds to the decode steps of batch_size sequences that it overlaps
        (pull transport: its kernel runs on the decode GPU)."""
        return kv_bytes * self._copy(batch_size) if self._copy is not None and batch_size > 0 else 0.0


def _surface(rows) -> _Surface | None:
    """(batch, context) -> seconds of some rows; None without rows."""
    return _Surface(zip(rows["batch"], rows["context"], rows["seconds"])) if len(rows) else None


def _means(pairs) -> dict:
    acc: dict = defaultdict(list)
    for k, v in pairs:
        acc[float(k)].append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def pick_profile(hardware: str, model: str, kind: str = "auto", profile: str | Path | None = None,
                 folder: str | Path | None = None) -> Path | None:
    """The profile a run uses: `profile` if given, else traces/profiles/<hardware>-<model>.csv when it
    exists (kind auto or calibrated); None means the analytic model."""
    if kind not in KINDS:
        raise ValueError(f"unknown cost model {kind!r}; choose {', '.join(KINDS)}")
    if kind == "analytic":
        if profile:
            raise ValueError("--profile and --cost-model analytic contradict each other: drop one")
        return None
    if profile:
        p = Path(profile)
        if not p.is_file():
            raise ProfileError(f"{p}: no such profile")
        return p
    p = default_profile_path(hardware, model, folder)
    if p.is_file():
        return p
    if kind == "calibrated":
        raise ProfileError(f"{p}: no such profile (measure it with python -m real.profile, or pass --profile FILE)")
    return None
