"""A run folder: requests.csv, steps.csv, decisions.csv, run.json, summary.json.

`write_run` is what sim.run and real.run call; `load_run` is what analysis and notebooks call:
    run = load_run("runs/20261126-120000-adaptive"); run.requests.head()
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .schema import DECISIONS, REQUESTS, STEPS, TraceSchemaError, read_table, write_table

FILES = ("requests.csv", "steps.csv", "decisions.csv", "run.json", "summary.json")


def git_commit(path: Path | None = None) -> str:
    """The pdlab source commit (with -dirty when the tree has changes), or 'unknown'."""
    where = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def versions(*modules: str) -> dict:
    out = {"python": platform.python_version()}
    for name in ("pdlab",) + modules:
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            mod = sys.modules.get(name)
            out[name] = getattr(mod, "__version__", "unknown") if mod else "not installed"
    return out


def default_run_dir(policy: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{stamp}-{policy}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{policy}-{n}"
    return path


def write_run(out_dir: str | Path, *, requests: list[tuple], steps: list[tuple], decisions: list[tuple],
              run_info: dict, summary: dict) -> Path:
    """Validate and write every file of a run folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / REQUESTS.filename, REQUESTS, requests)
    write_table(out / STEPS.filename, STEPS, steps)
    write_table(out / DECISIONS.filename, DECISIONS, decisions)
    info = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **run_info}
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_number) + "\n")
    return out


def _json_number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


@dataclass(slots=True)
class Run:
    path: Path
    requests: object  # pandas DataFrames
    steps: object
    decisions: object
    info: dict
    summary: dict


def load_run(path: str | Path) -> Run:
    """Read and validate a run folder written by sim.run or real.run."""
    p = Path(path)
    if not p.is_dir():
        raise TraceSchemaError(f"{p}: not a run folder (no such directory)")

    def _json(name: str) -> dict:
        f = p / name
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise TraceSchemaError(f"{f}: not valid JSON ({e})") from None

    return Run(p, read_table(p / REQUESTS.filename, REQUESTS), read_table(p / STEPS.filename, STEPS),
               read_table(p / DECISIONS.filename, DECISIONS), _json("run.json"), _json("summary.json"))
