"""The one trace schema: columns, dtypes and units of requests.csv, steps.csv, decisions.csv.

Both bodies (sim/ and real/) write through `write_table`, and analysis/ reads through
`read_table`, so a column cannot drift between them. Validation is vectorised (numpy on
columns) because the simulator writes a few hundred thousand step rows per run.
Run `python -m traces.schema` to print the documentation of every column.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEVICES = ("gpu0", "gpu1", "link")
MODES = ("single", "dp", "pd", "pipeline")
STAGES = ("prefill", "decode", "mixed", "attn", "ffn", "transfer")
STATUSES = ("finished", "failed", "rejected")
POLICY_PARTS = ("scheduler", "router", "rebalancer", "backpressure", "fallback", "injector")


NS_DIGITS = 9  # time columns (unit "s") are written rounded to this many decimals: whole nanoseconds


class TraceSchemaError(ValueError):
    """A table does not match the schema; the message names the file, row and column."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    dtype: str  # "float" | "int" | "str"
    unit: str
    doc: str
    nullable: bool = False  # empty cell allowed (NaN for floats)
    choices: tuple[str, ...] | None = None
    min_value: float | None = None


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    doc: str

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def filename(self) -> str:
        return f"{self.name}.csv"


def _f(name, unit, doc, **kw):
    return Column(name, "float", unit, doc, **kw)


def _i(name, unit, doc, **kw):
    return Column(name, "int", unit, doc, **kw)


def _s(name, doc, **kw):
    return Column(name, "str", "", doc, **kw)


REQUESTS = Table("requests", (
    _i("request_id", "", "id unique within the run", min_value=0),
    _f("arrival_s", "s", "arrival time since run start", min_value=0),
    _i("prompt_tokens", "tokens", "prompt length as served (after any clipping)", min_value=1),
    _i("output_tokens", "tokens", "output tokens requested (fixed-length replay)", min_value=1),
    _i("generated_tokens", "tokens", "output tokens actually produced", min_value=0),
    _f("prefill_start_s", "s", "first prefill chunk started (last attempt if recomputed)", nullable=True),
    _f("prefill_end_s", "s", "prefill finished, first token sampled", nullable=True),
    _f("kv_transfer_start_s", "s", "KV copy GPU0->GPU1 started; empty when colocated", nullable=True),
    _f("kv_transfer_end_s", "s", "KV copy finished", nullable=True),
    _f("first_token_s", "s", "first output token available (end of first prefill)", nullable=True),
    _f("finish_s", "s", "request ended (finished, failed or rejected)", nullable=True),
    _s("prefill_device", "device that ran the prefill", nullable=True, choices=DEVICES),
    _s("decode_device", "device that ran the decode", nullable=True, choices=DEVICES),
    _s("mode", "serving mode when the request was admitted", choices=MODES),
    _i("preemptions", "count", "times preempted and recomputed", min_value=0),
    _s("status", "how the request ended", choices=STATUSES),
    _s("fail_reason", "why it failed or was rejected", nullable=True),
), "one row per request")

STEPS = Table("steps", (
    _f("t_start_s", "s", "stage start since run start", min_value=0),
    _f("t_end_s", "s", "stage end (>= t_start_s)", min_value=0),
    _s("device", "where it ran", choices=DEVICES),
    _s("stage", "prefill | decode | mixed (colocated prefill chunks + decodes) | attn | ffn "
       "(GPU1 partitions when split) | transfer (KV copy on the link)", choices=STAGES),
    _i("batch_size", "requests", "requests in the stage", min_value=0),
    _i("tokens", "tokens", "tokens processed over the whole row (all num_steps)", min_value=0),
    _i("kv_tokens", "tokens", "KV tokens attended over in the row's first step", min_value=0),
    _i("attn_sms", "SMs", "attention partition size; 0 when GPU1 is not split", min_value=0),
    _i("ffn_sms", "SMs", "FFN partition size; 0 when GPU1 is not split", min_value=0),
    _i("microbatch", "", "micro-batch index; -1 when the row covers the whole batch", min_value=-1),
    _s("mode", "serving mode in force", choices=MODES),
    _i("num_steps", "steps", "consecutive identical-shape steps this row covers (sim merges "
       "them between events; the real engine writes 1)", min_value=1),
    _f("busy_s", "s", "time the stage's SMs (or the link) were busy within the row", min_value=0),
    _i("kv_bytes", "bytes", "bytes moved (transfer rows); 0 otherwise", min_value=0),
), "one row per executed stage (or run of identical decode steps)")

DECISIONS = Table("decisions", (
    _f("t_s", "s", "when the decision was taken", min_value=0),
    _s("policy", "which policy part decided", choices=POLICY_PARTS),
    _s("decision", "what kind of decision (mode, split, throttle, preempt, reject, hold, ...)"),
    _s("old", "value before", nullable=True),
    _s("new", "value after", nullable=True),
    _s("reason", "why, in words and measured numbers"),
), "one row per policy decision that changed something")

TABLES = {t.name: t for t in (REQUESTS, STEPS, DECISIONS)}


def _fail(path, problem: str, row: int | None = None, column: str | None = None) -> None:
    where = f"{path}" + (f": row {row}" if row is not None else "") + (f", column {column!r}" if column else "")
    raise TraceSchemaError(f"{where}: {problem}")


def _check_column(path, col: Column, values: np.ndarray, row_offset: int) -> None:
    """Vectorised checks of one column; rows are reported 1-based as in the CSV (header = row 1)."""
    if col.dtype == "str":
        missing = np.array([v is None or v == "" for v in values], dtype=bool) if len(values) else np.zeros(0, bool)
        if not col.nullable and missing.any():
            _fail(path, "empty value", int(np.argmax(missing)) + row_offset, col.name)
        if col.choices is not None:
            bad = ~missing & ~np.isin(values.astype(str), col.choices)
            if bad.any():
                i = int(np.argmax(bad))
                _fail(path, f"{values[i]!r} not in {list(col.choices)}", i + row_offset, col.name)
        return
    try:
        numbers = values.astype(float)
    except (TypeError, ValueError):
        for i, v in enumerate(values):
            try:
                float("nan" if v is None or v == "" else v)
            except (TypeError, ValueError):
                _fail(path, f"{v!r} is not a number", i + row_offset, col.name)
        raise
    nan = np.isnan(numbers)
    if not col.nullable and nan.any():
        _fail(path, "empty or NaN value", int(np.argmax(nan)) + row_offset, col.name)
    if np.isinf(numbers).any():
        _fail(path, "infinite value", int(np.argmax(np.isinf(numbers))) + row_offset, col.name)
    if col.dtype == "int":
        frac = ~nan & (numbers != np.round(numbers))
        if frac.any():
            _fail(path, f"{values[int(np.argmax(frac))]!r} is not an integer", int(np.argmax(frac)) + row_offset, col.name)
    if col.min_value is not None:
        low = ~nan & (numbers < col.min_value)
        if low.any():
            i = int(np.argmax(low))
            _fail(path, f"{numbers[i]} is below the minimum {col.min_value}", i + row_offset, col.name)


def _check_table(path, table: Table, columns: dict[str, np.ndarray]) -> None:
    for col in table.columns:
        _check_column(path, col, columns[col.name], row_offset=2)
    if table is STEPS and len(columns["t_start_s"]):
        bad = columns["t_end_s"].astype(float) < columns["t_start_s"].astype(float) - 1e-12
        if bad.any():
            _fail(path, "t_end_s before t_start_s", int(np.argmax(bad)) + 2, "t_end_s")


def write_table(path: str | Path, table: Table, rows: list[tuple]) -> Path:
    """Validate `rows` (tuples in the table's column order) and write them as CSV."""
    path = Path(path)
    width = len(table.columns)
    for i, r in enumerate(rows):
        if len(r) != width:
            _fail(path, f"has {len(r)} values, the schema has {width}: {table.names}", i + 2)
    cols = list(zip(*rows)) if rows else [()] * width
    columns = {c.name: np.array(v, dtype=object) for c, v in zip(table.columns, cols)}
    _check_table(path, table, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.names)
        w.writerows(_to_ns(table, rows, cols))  # csv writes None as an empty cell
    return path


def _to_ns(table: Table, rows: list[tuple], cols: list):
    """`rows` with times in seconds rounded to the nanosecond, the clocks' resolution (time.perf_counter's on
    Linux; a difference of two perf_counter floats carries ~1e-12 s of float noise in its last digits, which
    cost 30% of a run archive's compressed size). `cols` are the rows' columns. Rounding keeps order, so
    t_end_s >= t_start_s still holds; other floats, and tables other than the three trace tables (profiles:
    medians of sub-microsecond rates), keep full precision."""
    at = [i for i, c in enumerate(table.columns) if c.dtype == "float" and c.unit == "s"]
    if TABLES.get(table.name) is not table or not at or not rows:
        return rows
    cols = list(cols)
    for i in at:
        try:  # vectorised: a simulated run writes a few hundred thousand step rows
            rounded = np.round(np.asarray(cols[i], dtype=float), NS_DIGITS).tolist()
        except (TypeError, ValueError):  # a cell that is not a number (validation let it through: "" when nullable)
            rounded = [round(v, NS_DIGITS) if isinstance(v, float) else v for v in cols[i]]
        cols[i] = [v if v is None or isinstance(v, str) else r for v, r in zip(cols[i], rounded)]
    return zip(*cols)


def read_table(path: str | Path, table: Table):
    """Read and validate a table; returns a pandas DataFrame with the schema's dtypes."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TraceSchemaError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for unreadable files
        raise TraceSchemaError(f"{path}: unreadable CSV ({e})") from None
    missing = [n for n in table.names if n not in df.columns]
    if missing:
        _fail(path, f"missing columns {missing}")
    columns = {}
    for col in table.columns:
        raw = df[col.name].to_numpy(dtype=object)
        columns[col.name] = raw if col.dtype == "str" else _numbers(path, df[col.name], col.name)
    _check_table(path, table, columns)
    out = pd.DataFrame({c.name: _typed(c, columns[c.name]) for c in table.columns})
    return out


def _numbers(path, raw, name: str) -> np.ndarray:
    import pandas as pd

    numbers = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(numbers) & (raw.to_numpy(dtype=object) != "") & (raw.str.lower() != "nan").to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        _fail(path, f"{raw.iloc[i]!r} is not a number", i + 2, name)
    return numbers


def _typed(col: Column, values: np.ndarray):
    import pandas as pd

    if col.dtype == "str":
        return pd.array([None if v == "" else v for v in values], dtype="string")
    if col.dtype == "int":
        return pd.array([None if np.isnan(v) else int(v) for v in values], dtype="Int64")
    return values.astype(float)


def describe() -> str:
    """Markdown documentation of every table and column."""
    out = [f"Times (unit s) are seconds since the run's start, written to the nanosecond ({NS_DIGITS} decimals).\n"]
    for t in TABLES.values():
        out.append(f"### {t.filename}: {t.doc}\n\n| column | type | unit | meaning |\n|---|---|---|---|")
        for c in t.columns:
            extra = f" One of {', '.join(c.choices)}." if c.choices else ""
            extra += " May be empty." if c.nullable else ""
            out.append(f"| `{c.name}` | {c.dtype} | {c.unit} | {c.doc}.{extra} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(describe())
