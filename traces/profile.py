"""The measured-profile format: what `python -m real.profile` writes and `sim.calibrated` reads.

One CSV row per measurement (median wall time of repeated runs of one shape), a JSON file of
metadata beside it (same stem): traces/profiles/<hardware>-<model>.csv + .json, hardware and model
being presets of policies/specs.py. Validated on write and on read through traces/schema.py's
machinery, so a bad file ends in one line naming the file, row and column.

    python -m traces.profile                 # document every column and op
    python -m traces.profile FILE.csv        # validate FILE and count its rows per op
    python -m traces.profile merge OUT.csv A.csv B.csv [...]   # each shape the median over several profiles
    python -m traces.profile extend OUT.csv BASE.csv EXTRA.csv [--ops OP ...]  # BASE + the shapes only EXTRA
                                             # has (of these ops), scaled to BASE

Timing contract (what the calibrated model assumes; see sim/calibrated.py):
  prefill, decode, pipeline: a whole engine step as the runner runs it (stage inputs, launch, forward,
    LM head, sampling, tokens back on the host), without the policy's scheduling; the simulator uses
    these times as the step times. `host` rows (staging + launch alone) are informational.
  mixed: a colocated step (decode pass + prefill chunk, one LM head) timed whole; the simulator scales its
    composition of the prefill and decode rows by mixed row / that composition at the row's shape.
  attn, ffn, seq, pair: one decoder layer, all timed the same way (they are used as ratios).
  decode_program: one layer's decode-attention kernel with one program per SM at most; the simulator
    takes its slope over context as one program's time per token and adds the decode tail (the longest
    sequence's unsplit program outlasting the rest) to decode steps of mixed context lengths.
  engine_*: the same steps timed inside the real engine's body (LLMEngine: a launch thread per GPU, the
    policies and completion polling on the main thread, one process), launch to next launch; the
    simulator adds engine row - the isolated step at the same shape to every step (sim/overhead.py).
    Their p10/p50/p90/p99_over_mean columns give the spread of those periods (quantile / mean): real
    steps have a heavy tail the mean hides, and the simulator draws each step from it (sim/variability.py).
    Profiles written before these columns existed still load (the columns read as empty).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .schema import Column, Table, TraceSchemaError, _check_table, read_table, write_table

ENGINE_OPS = ("engine_decode", "engine_decode_busy", "engine_prefill", "engine_prefill_busy", "engine_decode_single",
              "engine_prefill_single")
# an engine decode row's isolated twin, timed in the engine rows' own process (real/engine_profile.py isolated_row)
ENGINE_ISOLATED_OPS = ("engine_decode_isolated", "engine_decode_single_isolated")
OPS = ("prefill", "decode", "pipeline", "attn", "ffn", "seq", "pair", "transfer", "host", "decode_program",
       "decode_tail", "decode_copy", "mixed", "decode_prefill_gpu") + ENGINE_OPS + ENGINE_ISOLATED_OPS
OP_DOCS = {
    "prefill": "one whole forward of `batch` sequences of tokens/batch new tokens each after `context` cached "
               "ones: all layers, LM head on each last token, sampling",
    "decode": "one whole decode step on the whole GPU: input staging, CUDA graph replay, LM head, sampling "
              "(tokens = batch, context = cached tokens per sequence)",
    "pipeline": "one whole decode step pipelined layer by layer in `microbatches` micro-batches, attention on "
                "attn_sms SMs, FFN on ffn_sms SMs",
    "attn": "ONE decoder layer's attention half (norm, QKV, rope, KV store, attention, O-proj) of `batch` "
            "sequences on attn_sms SMs (0 or the GPU's SM count: whole GPU)",
    "ffn": "ONE decoder layer's FFN half (norm, gate/up, SiLU*mul, down) of `batch` tokens on ffn_sms SMs "
           "(0 or the GPU's SM count: whole GPU)",
    "seq": "ONE decoder layer's attention half then its FFN half of `batch` sequences on the whole GPU",
    "pair": "ONE layer's attention of `batch` sequences on attn_sms SMs concurrently with an FFN of `batch` "
            "tokens on ffn_sms SMs (independent micro-batches): the slot time",
    "transfer": "one request's KV cache, `bytes` bytes, copied GPU0 -> GPU1 through the engine transport "
                "(gather, copy, scatter)",
    "host": "CPU time to stage and launch one decode step at `batch` (already inside the decode rows' time: "
            "informational, what the GPU must hide)",
    "decode_program": "ONE layer's paged-decode attention kernel, unsplit, with `batch` sequences of `context` "
                      "tokens: batch x kv heads programs, at most one per SM, so each streams its sequence's KV "
                      "alone; the slope over context is one program's time per token (the decode tail: the "
                      "longest sequence's program, sim/calibrated.py)",
    "decode_tail": "what mixing context lengths ADDS to a decode step of `batch` sequences: the step on "
                   "tail_mix_contexts (every 8th sequence `context` tokens long, the rest 1,024) minus the step on "
                   "uniform contexts of the same mean (the same KV read); sequential (attn_sms 0) or pipelined "
                   "on a split in `microbatches`. A difference of two timings, so noise can make it negative",
    "decode_copy": "the time one request's KV copy into the decode GPU (`tokens` tokens, `bytes` bytes, through "
                   "the engine transport) ADDS to back-to-back decode steps of `batch` sequences of `context` tokens "
                   "that it overlaps: a difference of two timings, so noise can make it slightly negative",
    "mixed": "one colocated step (single, dp: chunked prefill beside the running decodes) as the runner runs it: "
             "a decode pass of `batch` sequences of `context` cached tokens and a prefill chunk of `tokens` new "
             "tokens (no cached prefix), one LM head and sampling for both, on the prefill GPU",
    "decode_prefill_gpu": "a decode step as the decode rows time it, on the prefill GPU (GPU0: where single and dp "
                          "decode too), when the decode side was timed on another GPU: the two GPUs' speed ratio",
    "engine_decode": "one decode step of `batch` sequences (context: cached tokens per sequence) inside the real "
                     "engine's body, from its launch to the next step's launch (policy, launch thread, completion "
                     "polling, the gap between steps), the prefill GPU idle",
    "engine_decode_busy": "the same while the prefill GPU's launch thread runs prefills back to back",
    "engine_prefill": "one prefill of `batch` sequences, `tokens` new tokens in all, inside the real engine's body, "
                      "launch to next launch, the decode GPU idle",
    "engine_prefill_busy": "the same while the decode GPU's launch thread runs decode steps back to back",
    "engine_decode_single": "engine_decode under policy single: a one-GPU engine (no launch thread) decoding on "
                            "GPU0; the simulator takes single's decode overhead from these",
    "engine_prefill_single": "engine_prefill under policy single: prefills on GPU0 in the one-GPU engine, nothing "
                             "decoding; the simulator takes single's prefill and mixed-step overhead from these",
    "engine_decode_isolated": "the isolated decode step (as `decode` rows are timed) at an engine_decode row's shape "
                              "and spread of contexts, timed in the engine rows' process: the simulator's overhead is "
                              "the engine row less this where it has one (no process-to-process speed in it)",
    "engine_decode_single_isolated": "the same for an engine_decode_single row, on GPU0 in the one-GPU engine's process",
}
NEEDS_BATCH = ("prefill", "decode", "pipeline", "attn", "ffn", "seq", "pair", "host", "decode_program",
               "decode_tail", "mixed", "decode_prefill_gpu") + ENGINE_OPS + ENGINE_ISOLATED_OPS
TOKENS_EQ_BATCH = ("decode", "pipeline", "attn", "ffn", "seq", "pair", "engine_decode", "engine_decode_busy",
                   "engine_decode_single", "decode_program", "decode_tail", "decode_prefill_gpu") + ENGINE_ISOLATED_OPS
DIFFERENCE_OPS = ("decode_copy", "decode_tail")  # a difference of two timings: may be <= 0
# differences of two timings on one machine, read by the simulator against its own model of the same shape (a
# ratio): pooled or grafted from fewer profiles as measured, not scaled to the pool's level (merge, extend)
AS_MEASURED_OPS = ("decode_tail",)
META_KEYS = ("gpu", "date", "command", "model", "hardware", "torch", "sms")
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

SPREAD_PERCENTILES = (10, 50, 90, 99)  # the spread columns' percentiles of period / mean, in column order
PROFILE = Table("profile", (
    Column("op", "str", "", "what was measured: one of " + ", ".join(OPS), choices=OPS),
    Column("batch", "int", "sequences", "sequences in the forward (transfer: 1; mixed: the decodes)",
           min_value=0),
    Column("tokens", "int", "tokens", "new tokens in the forward; prefill, engine_prefill*: total over the batch; mixed: the prefill chunk's; "
           "decode/pipeline/attn/ffn/seq/pair/engine_decode*: = batch; transfer: the request's KV tokens", min_value=0),
    Column("context", "int", "tokens", "tokens already cached per sequence before this forward "
           "(decode: context length; prefill: prefix length)", min_value=0),
    Column("attn_sms", "int", "SMs", "attention partition; 0 with ffn_sms 0 = whole GPU, sequential", min_value=0),
    Column("ffn_sms", "int", "SMs", "FFN partition; 0 with attn_sms 0 = whole GPU, sequential", min_value=0),
    Column("microbatches", "int", "", "micro-batches of a pipelined step; 1 otherwise", min_value=1),
    Column("bytes", "int", "bytes", "KV bytes moved (transfer and decode_copy rows); 0 otherwise", min_value=0),
    Column("seconds", "float", "s", "median measured wall time (engine_*: mean launch-to-launch period; "
           "decode_copy: the time a copy adds, which alone may be < 0)"),
) + tuple(Column(f"p{q}_over_mean", "float", "", f"engine_* rows: the {q}th percentile of the launch-to-launch "
                 "periods over their mean; empty: spread not measured (other ops, older profiles)",
                 nullable=True, min_value=0) for q in SPREAD_PERCENTILES), "one row per measured shape")
COLUMNS = PROFILE.names
SPREAD_COLUMNS = tuple(f"p{q}_over_mean" for q in SPREAD_PERCENTILES)
LEGACY_PROFILE = Table("profile", PROFILE.columns[:-4], PROFILE.doc)  # the format before the spread columns
_DEFAULTS = dict(batch=1, tokens=None, context=0, attn_sms=0, ffn_sms=0, microbatches=1, bytes=0,
                 **dict.fromkeys(SPREAD_COLUMNS))


def tail_mix_contexts(batch: int, long: int = 8192, short: int = 1024, every: int = 8) -> list[int]:
    """The decode_tail rows' mixed contexts: every `every`-th sequence `long`, the rest `short`, so each
    contiguous micro-batch (the pipeline's halves) holds long ones too, as served batches do."""
    return [long if i % every == every - 1 else short for i in range(batch)]


def placed_tail_contexts(batch: int, long: int, place: str = "every8", short: int = 1024) -> list[int]:
    """tail_mix_contexts (`every8`), or one `long` sequence first or last among `short` ones. Why first/last: a
    pipelined graph halves the batch padded to its bucket (33 sequences: 24 + 9 in halves of 48), so where the long one
    sits decides which micro-batch, and how big a kernel grid, streams it (bench/pipeline_diag.py --tail-place)."""
    if place == "every8":
        return tail_mix_contexts(batch, long, short)
    if place not in ("first", "last"):
        raise ValueError(f"unknown tail placement {place!r}: every8, first or last")
    contexts = [short] * batch
    contexts[0 if place == "first" else -1] = long
    return contexts


class ProfileError(TraceSchemaError):
    """A profile does not match the format; the message names the file (and row, column)."""


def default_profile_path(hardware: str, model: str, folder: str | Path | None = None) -> Path:
    """Where `python -m real.profile` writes, and where sim.run looks by default."""
    return Path(folder or PROFILES_DIR) / f"{hardware}-{model}.csv"


def meta_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def _as_tuple(path, i: int, row) -> tuple:
    """A row as a tuple in column order; dicts may leave out defaulted columns (tokens defaults to batch)."""
    if not isinstance(row, dict):  # a tuple in the legacy column order reads as one without spread columns
        return tuple(row) + (None,) * (len(COLUMNS) - len(row)) if len(row) == len(LEGACY_PROFILE.columns) \
            else tuple(row)
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ProfileError(f"{path}: row {i + 2}: unknown column(s) {sorted(unknown)}; columns are {COLUMNS}")
    full = dict(_DEFAULTS, **row)
    if full["tokens"] is None:
        full["tokens"] = full["batch"]
    missing = [c for c in ("op", "seconds") if c not in full]
    if missing:
        raise ProfileError(f"{path}: row {i + 2}: missing {missing}")
    return tuple(full[c] for c in COLUMNS)


def check_rows(path, df, sms: int | None = None) -> None:
    """Checks across columns, per op (the schema checks each column alone)."""
    op = df["op"].to_numpy(dtype=object)
    batch, tokens = df["batch"].to_numpy(dtype=float), df["tokens"].to_numpy(dtype=float)
    a, f = df["attn_sms"].to_numpy(dtype=float), df["ffn_sms"].to_numpy(dtype=float)
    checks = [
        ((df["seconds"].to_numpy(dtype=float) <= 0) & ~np.isin(op, DIFFERENCE_OPS), "seconds",
         "a measurement must take more than 0 seconds"),
        (np.isin(op, NEEDS_BATCH + ("decode_copy",)) & (batch < 1), "batch", "must be >= 1 for this op"),
        (np.isin(op, TOKENS_EQ_BATCH) & (tokens != batch), "tokens", "must equal batch for this op"),
        (np.isin(op, ("prefill", "engine_prefill", "engine_prefill_busy")) & (tokens < batch), "tokens",
         "prefill tokens (total) must be >= batch"),
        (np.isin(op, ("pipeline", "pair")) & ((a < 1) | (f < 1)), "attn_sms",
         "pipeline and pair rows need both attn_sms and ffn_sms > 0"),
        ((op == "attn") & (f > 0) & (a < 1), "attn_sms", "attn rows give their partition in attn_sms"),
        ((op == "ffn") & (a > 0) & (f < 1), "ffn_sms", "ffn rows give their partition in ffn_sms"),
    ]
    spread = df[list(SPREAD_COLUMNS)].to_numpy(dtype=float)
    given = ~np.isnan(spread)
    some = given.any(axis=1)
    steps = np.diff(np.where(given, spread, 0.0), axis=1)
    checks += [
        (some & ~given.all(axis=1), SPREAD_COLUMNS[0], "give all four spread columns or none"),
        (some & ~np.isin(op, ENGINE_OPS), SPREAD_COLUMNS[0], "only engine_* rows have a spread"),
        (some & (spread[:, 0] <= 0), SPREAD_COLUMNS[0], "a period is never 0: the ratio must be > 0"),
        (some & (steps < 0).any(axis=1), SPREAD_COLUMNS[0], "quantiles must not decrease (p10 <= p50 <= p90 <= p99)"),
    ]
    if sms:
        checks.append((np.where(np.isin(op, ("pipeline", "pair")), a + f, np.maximum(a, f)) > sms, "attn_sms",
                       f"partitions exceed the GPU's {sms} SMs"))
    for bad, column, problem in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise ProfileError(f"{path}: row {i + 2}, column {column!r}: {problem} (op {op[i]})")


def _check_meta(path, meta) -> dict:
    if not isinstance(meta, dict):
        raise ProfileError(f"{meta_path(path)}: metadata must be a JSON object")
    if "sms" in meta and not (isinstance(meta["sms"], int) and meta["sms"] > 0):
        raise ProfileError(f"{meta_path(path)}: 'sms' must be a positive integer, got {meta['sms']!r}")
    return meta


def write_profile(path: str | Path, rows: list, meta: dict) -> Path:
    """Validate and write rows (tuples in COLUMNS order, or dicts) and the metadata JSON beside them."""
    import pandas as pd

    path = Path(path)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ProfileError(f"{meta_path(path)}: metadata lacks {missing} (needs {list(META_KEYS)})")
    _check_meta(path, meta)
    tuples = [_as_tuple(path, i, r) for i, r in enumerate(rows)]
    if not tuples:
        raise ProfileError(f"{path}: no rows to write")
    try:
        if all(len(t) == len(COLUMNS) for t in tuples):  # check everything before anything is written
            _check_table(path, PROFILE, {c: np.array(v, dtype=object) for c, v in zip(COLUMNS, zip(*tuples))})
            check_rows(path, pd.DataFrame(tuples, columns=COLUMNS), meta.get("sms"))
        write_table(path, PROFILE, tuples)
    except ProfileError:
        raise
    except TraceSchemaError as e:
        raise ProfileError(str(e)) from None
    meta_path(path).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


def read_profile(path: str | Path):
    """(DataFrame with plain int/float columns, metadata dict); {} when the JSON file is absent."""
    path = Path(path)
    try:
        df = read_table(path, PROFILE if _has_spread_columns(path) else LEGACY_PROFILE)
    except ProfileError:
        raise
    except TraceSchemaError as e:
        raise ProfileError(str(e)) from None
    if df.empty:
        raise ProfileError(f"{path}: no rows")
    for c in SPREAD_COLUMNS:
        if c not in df:
            df[c] = np.nan
    for c in COLUMNS:
        if c not in ("op", "seconds") + SPREAD_COLUMNS:
            df[c] = df[c].astype("int64")
    df["op"] = df["op"].astype(object)
    meta = {}
    mp = meta_path(path)
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text())
        except json.JSONDecodeError as e:
            raise ProfileError(f"{mp}: not valid JSON ({e})") from None
        _check_meta(path, meta)
    check_rows(path, df, meta.get("sms"))
    return df, meta


def _has_spread_columns(path: Path) -> bool:
    """Does the CSV header name any spread column (older profiles have none and read without them)?"""
    import csv

    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return True  # read_table reports the problem
    return any(c in header for c in SPREAD_COLUMNS)


SHAPE_COLUMNS = tuple(c for c in COLUMNS if c not in ("seconds",) + SPREAD_COLUMNS)
MERGE_MUST_AGREE = ("gpu", "model", "hardware", "sms", "kv_transport")


def group_shapes(rows, context_tolerance: float = 0.01) -> list[list[tuple[int, dict]]]:
    """Rows of several measurements, given as (source, row dict), grouped by shape: every shape column but
    `context` equal (a dict may leave defaulted columns out), contexts within `context_tolerance` of each
    other. Why the tolerance: the engine_* rows record the contexts they measured, which move by a token or
    two from one process to the next."""
    others = [c for c in SHAPE_COLUMNS if c != "context"]

    def key(row):
        full = dict(_DEFAULTS, **row)
        if full["tokens"] is None:
            full["tokens"] = full["batch"]
        return tuple(full[c] for c in others), int(full["context"])

    tagged = sorted(((key(row), source, row) for source, row in rows), key=lambda t: t[0])
    groups, last = [], None
    for (shape, ctx), source, row in tagged:
        if last is not None and shape == last[0] and ctx - last[1] <= context_tolerance * max(last[1], 1):
            groups[-1].append((source, row))
        else:
            groups.append([(source, row)])
        last = (shape, ctx)
    return groups


def median_row(group: list[tuple[int, dict]]) -> dict:
    """One row for a group_shapes group: its seconds, spread columns and context the median over the sources
    (an even count: the mean of the middle two), a source with several rows counting once by their median;
    the other columns from its first row, keeping only the columns its rows give."""
    per: dict[int, list[dict]] = {}
    for source, row in group:
        per.setdefault(source, []).append(row)
    keys = [k for k in COLUMNS if any(k in row for _, row in group)]
    out = {k: group[0][1][k] for k in keys if k not in ("context", "seconds") + SPREAD_COLUMNS}

    def median(column):
        values = [float(np.median([r[column] for r in rs if r.get(column) is not None])) for rs in per.values()
                  if any(r.get(column) is not None for r in rs)]
        values = [v for v in values if not np.isnan(v)]
        return float(np.median(values)) if values else None

    if "context" in keys:
        out["context"] = int(np.median([row.get("context", 0) for _, row in group]))
    for c in ("seconds",) + SPREAD_COLUMNS:
        if c in keys:
            out[c] = median(c)
    return {k: out[k] for k in keys}


def collapse_near_duplicates(df, context_tolerance: float = 0.01):
    """(DataFrame, how many rows were folded into others): one profile's rows of one shape within
    `context_tolerance` in context (group_shapes) as one row, their median_row. Why: interpolating between
    two rows a token apart reads their noise as a slope; 2x H200 profiles timed with the engine rows in two
    processes held engine_decode_busy at batch 64 at contexts 2,146 and 2,147 (6.88 and 7.16 ms), and the
    simulator, extrapolating that slope, charged a batch-64 step at 4,096 tokens 537 ms of overhead."""
    import pandas as pd

    records = df.to_dict("records")
    groups = group_shapes(list(enumerate(records)), context_tolerance)
    if len(groups) == len(records):
        return df, 0
    first = {id(r): i for i, r in enumerate(records)}
    groups.sort(key=lambda g: min(first[id(r)] for _, r in g))
    rows = [dict(g[0][1], **median_row(g)) if len(g) > 1 else g[0][1] for g in groups]
    out = pd.DataFrame(rows, columns=df.columns).astype(df.dtypes.to_dict())
    return out, len(records) - len(groups)


def merge_profiles(paths: list, context_tolerance: float = 0.01) -> tuple[list[dict], dict]:
    """(rows, metadata) of one profile whose every shape is the median over several profiles of one GPU and
    model. Why: a profile is timed in one process on one machine, and a GPU's speed moves from process to
    process and machine to machine (decode steps 3.5-11% over 9 fresh processes on one H200,
    bench/results/gpu_process_spread_NVIDIA_H200.json; 2x H200 profiles of one engine read its decode steps
    up to 9% apart), so one profile's luck lands in every simulated step. The median of several keeps the
    typical machine's speed.

    Rows match by group_shapes; each merged row is their median_row. A shape measured in fewer than half of
    the profiles (a grid point only newer profiles time, such as decode batches 32, 96 and 128) keeps its
    profiles' median scaled to the pool: times the median, over its profiles, of each one's pooled/own
    seconds ratio at the shapes of its family (op, SM split, micro-batches) that the pool kept. Why: such a
    point's place relative to its neighbours (the cost curve's bend, which interpolation between the other
    points misses) is what it adds; its level is one machine's luck, which the pool exists to remove. A
    partial shape with no such shared family shapes is dropped. Both are listed in the metadata
    (`merge.scaled`, `merge.dropped`). AS_MEASURED_OPS rows (differences the simulator reads against its own
    model of the same shape) join unscaled, marked `as_measured`."""
    if len(paths) < 2:
        raise ProfileError(f"merging needs at least 2 profiles, got {len(paths)}")
    frames, metas = [], []
    for path in paths:
        df, meta = read_profile(path)
        frames.append(df)
        metas.append(meta)
    for key in MERGE_MUST_AGREE:
        seen = {json.dumps(m.get(key)) for m in metas if key in m}
        if len(seen) > 1:
            raise ProfileError(f"the profiles differ in {key!r} ({', '.join(sorted(seen))}): merge only "
                               "profiles of one GPU, model and KV transport")
    tagged = [(i, {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()})
              for i, df in enumerate(frames) for r in df.to_dict("records")]
    rows, partial, dropped, scaled, need = [], [], [], [], (len(paths) + 1) // 2
    ratios: dict = {}  # (source, family) -> pooled / own seconds at the family's kept shapes
    for group in group_shapes(tagged, context_tolerance):
        row = median_row(group)
        if len({source for source, _ in group}) < need:
            partial.append((group, row))
            continue
        rows.append(row)
        for source, own in group:
            if own["seconds"] > 0:
                ratios.setdefault((source, _family(own)), []).append(row["seconds"] / own["seconds"])
    for group, row in partial:
        sources = sorted({source for source, _ in group})
        found = [float(np.median(ratios[(s, _family(row))])) for s in sources if (s, _family(row)) in ratios]
        _add_scaled(rows, row, found, {**{c: row[c] for c in SHAPE_COLUMNS}, "profiles": len(sources)}, scaled, dropped)
    _in_op_order(rows)
    meta = dict(metas[0])
    meta["date"] = max(str(m.get("date", "")) for m in metas)
    meta["command"] = "python -m traces.profile merge OUT " + " ".join(str(p) for p in paths)
    meta["merge"] = {
        "statistic": "each shape's seconds and spread columns: the median over the profiles (even count: the "
                     "mean of the middle two); other metadata from the first profile",
        "profiles": [{"path": str(p), "date": m.get("date"), "command": m.get("command"),
                      "gpu_state": m.get("gpu_state")} for p, m in zip(paths, metas)],
        "context_tolerance": context_tolerance,
        "scaled": scaled,
        "dropped": dropped,
    }
    for key in ("gpu_state", "seconds"):
        meta.pop(key, None)
    return rows, meta


def extend_profile(base, extra, context_tolerance: float = 0.01, ops=None) -> tuple[list[dict], dict]:
    """(rows, metadata): profile `base` whole, plus the shapes only `extra` measured (new grid points timed on
    another machine or in a short run), each scaled to `base` by the median, over its family (op, SM split,
    micro-batches), of base/extra seconds at the shapes both measured. Why: such a point's place between its
    neighbours (where the cost curve bends between two knots) is what it adds; its level is the other
    machine's. It is a fair graft where `base` has the new shapes' neighbours: a machine's curve between far
    knots is its own (the committed default, decode knots 64 and 256 only, took another H200's 128 at 5.65 ms
    where its own line gave 5.83, and pd's simulated TPOT on session 16's runs went -4.0 -> -7.7%). A new shape
    whose family shares no shape with `base` is dropped; AS_MEASURED_OPS rows join unscaled. Both are listed in the
    metadata (`extend.scaled`, `extend.dropped`). `ops`: graft only these ops' new shapes (the rest of `extra`
    still sets the scales), e.g. decode_tail rows alone where other new knots were measured not to help."""
    (bdf, bmeta), (edf, emeta) = read_profile(base), read_profile(extra)
    for key in MERGE_MUST_AGREE:
        if bmeta.get(key) is not None and emeta.get(key) is not None and bmeta[key] != emeta[key]:  # None: not measured
            raise ProfileError(f"the profiles differ in {key!r} ({bmeta[key]!r}, {emeta[key]!r}): extend a profile "
                               "only with one of the same GPU, model and KV transport")

    def records(df):
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in df.to_dict("records")]

    base_rows = records(bdf)
    groups = group_shapes([(0, r) for r in base_rows] + [(1, r) for r in records(edf)], context_tolerance)
    ratios: dict = {}
    new = []
    for group in groups:
        mine = [r["seconds"] for src, r in group if src == 0]
        theirs = [r["seconds"] for src, r in group if src == 1 and r["seconds"] > 0]
        if not mine:
            new.append(median_row(group))
        elif theirs:
            ratios.setdefault(_family(group[0][1]), []).append(float(np.median(mine)) / float(np.median(theirs)))
    if ops is not None:
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ProfileError(f"extend --ops: unknown op(s) {unknown}; ops are {', '.join(OPS)}")
        new = [row for row in new if row["op"] in ops]
    rows, scaled, dropped = list(base_rows), [], []
    for row in new:
        _add_scaled(rows, row, ratios.get(_family(row)), {c: row[c] for c in SHAPE_COLUMNS if c in row}, scaled, dropped)
    _in_op_order(rows)
    meta = dict(bmeta)
    meta["command"] = f"python -m traces.profile extend OUT {base} {extra}" + (f" --ops {' '.join(ops)}" if ops else "")
    before = {"extend": bmeta["extend"]} if bmeta.get("extend") else {}  # a graft on a graft: keep the chain
    meta["extend"] = {"base": {"path": str(base), "date": bmeta.get("date"), "command": bmeta.get("command"), **before},
                      "extra": {"path": str(extra), "date": emeta.get("date"), "command": emeta.get("command"),
                                "gpu_state": emeta.get("gpu_state")},
                      "statistic": "base's rows unchanged; each shape only extra measured x the median base/extra "
                                   "seconds over its family's shared shapes (op, SM split, micro-batches)",
                      "context_tolerance": context_tolerance, "ops": list(ops) if ops is not None else "all",
                      "scaled": scaled, "dropped": dropped}
    return rows, meta


def _add_scaled(rows: list, row: dict, found: list | None, note: dict, scaled: list, dropped: list) -> None:
    """A shape measured by only some profiles: into `rows` times the median of `found` (its family's ratios to
    the profile it joins), noted in `scaled`; with no ratio to go by, noted in `dropped` instead."""
    if row["op"] in AS_MEASURED_OPS:
        rows.append(dict(row))
        scaled.append({**note, "scale": 1.0, "as_measured": True})
        return
    if not found:
        dropped.append(note)
        return
    scale = float(np.median(found))
    rows.append({**row, "seconds": row["seconds"] * scale})
    scaled.append({**note, "scale": round(scale, 4)})


def _in_op_order(rows: list) -> None:
    """Sort profile rows as real.profile writes them: by op, then shape."""
    order = {op: n for n, op in enumerate(OPS)}
    rows.sort(key=lambda r: (order[r["op"]],) + tuple(r[c] for c in SHAPE_COLUMNS[1:]))


def _family(row: dict) -> tuple:
    """The shapes one pooled/own ratio stands for in merge_profiles: one op on one SM split and micro-batch count."""
    return row["op"], row.get("attn_sms", 0), row.get("ffn_sms", 0), row.get("microbatches", 1)


def describe() -> str:
    out = ["### profile CSV: one row per measured shape (JSON metadata beside it: "
           + ", ".join(META_KEYS) + ")\n", "| column | type | unit | meaning |", "|---|---|---|---|"]
    out += [f"| `{c.name}` | {c.dtype} | {c.unit} | {c.doc} |" for c in PROFILE.columns]
    out += ["", "| op | one row measures |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in OP_DOCS.items()]
    return "\n".join(out)


def _build_and_write(out: str, build) -> tuple[list[dict], dict] | None:
    """`build()`'s (rows, metadata) written to `out`; None (the error said in one line) if either fails."""
    try:
        rows, meta = build()
        write_profile(out, rows, meta)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(describe())
        return 0
    if args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if args[0] == "merge":
        if len(args) < 4:
            print("usage: python -m traces.profile merge OUT.csv IN.csv IN2.csv [...]", file=sys.stderr)
            return 2
        got = _build_and_write(args[1], lambda: merge_profiles(args[2:]))
        if got is None:
            return 2
        rows, merged = got[0], got[1]["merge"]
        kept = sum(bool(e.get("as_measured")) for e in merged["scaled"])
        print(f"{args[1]}: {len(rows)} shapes, each the median of {len(args) - 2} profiles"
              + (f"; {len(merged['scaled'])} shapes in fewer than half of them scaled to the pool"
                 + (f" ({kept} of them {'/'.join(AS_MEASURED_OPS)} rows, as measured)" if kept else "")
                 if merged["scaled"] else "")
              + (f"; {len(merged['dropped'])} shapes in fewer than half of them, with no shared shapes "
                 "of their kind, dropped" if merged["dropped"] else ""))
        return 0
    if args[0] == "extend":
        ops = None
        if "--ops" in args:
            i = args.index("--ops")
            args, ops = args[:i], args[i + 1:]
        if len(args) != 4 or (ops is not None and not ops):
            print("usage: python -m traces.profile extend OUT.csv BASE.csv EXTRA.csv [--ops OP [OP ...]]",
                  file=sys.stderr)
            return 2
        got = _build_and_write(args[1], lambda: extend_profile(args[2], args[3], ops=ops))
        if got is None:
            return 2
        ext = got[1]["extend"]
        kept = sum(bool(e.get("as_measured")) for e in ext["scaled"])
        print(f"{args[1]}: {args[2]}'s rows and {len(ext['scaled'])} shapes only {args[3]} measured, scaled to it"
              + (f" ({kept} of them {'/'.join(AS_MEASURED_OPS)} rows, as measured)" if kept else "")
              + (f"; {len(ext['dropped'])} with no shared shapes of their kind dropped" if ext["dropped"] else ""))
        return 0
    try:
        df, meta = read_profile(args[0])
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args[0]}: {len(df)} rows; " + ", ".join(f"{op} {n}" for op, n in df["op"].value_counts().items()))
    print("meta: " + (json.dumps(meta) if meta else "(no JSON beside the CSV)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
