"""Where a benchmark writes its JSON: bench/results/<stem>_<gpu>.json unless --out says otherwise."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def results_path(out: str | None, stem: str, gpu: str) -> Path:
    """--out, or bench/results/<stem>_<GPU name with underscores>.json; its folder exists on return."""
    path = Path(out or ROOT / f"bench/results/{stem}_{gpu.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_results(path: Path, results: dict, default=None) -> None:
    """The results as indented JSON (rewritten whole: a benchmark writes partial results as it goes)."""
    path.write_text(json.dumps(results, indent=2, default=default) + "\n")
