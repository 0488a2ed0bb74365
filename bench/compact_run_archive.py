"""Rewrite committed run archives (tar.xz of run folders) with times to the nanosecond, as traces.schema now writes them.

Why: the real engine's times are differences of time.perf_counter floats, whole nanoseconds plus ~1e-12 s of
float noise in their last digits; those digits do not compress, and the run archives under bench/results were
most of the working tree that travels to the GPU machines (its limit is 64 MiB). Rounding to the clock's
resolution (9 decimals of a second) loses no measured information and makes an archive ~30% smaller.

Only the time columns (unit "s") of requests.csv, steps.csv and decisions.csv change, cell by cell, and each
is rewritten as traces.schema.write_table would write it; every other file and cell keeps its bytes. Each run
folder's numbers (analysis.metrics.summarize: requests, steps, decisions) are compared before and after, and an archive whose
metrics moved more than --tolerance (relative) is left as it was.

    python bench/compact_run_archive.py bench/results/fidelity_runs_*.tar.xz
"""
from __future__ import annotations

import argparse
import csv
import io
import lzma
import math
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traces.schema import NS_DIGITS, TABLES  # noqa: E402


def round_table(text: str, table) -> str:
    """A trace CSV's text with its time columns rounded to the nanosecond; other cells verbatim."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    at = [i for i, name in enumerate(rows[0])
          if (c := next((c for c in table.columns if c.name == name), None)) and c.dtype == "float" and c.unit == "s"]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n" if "\r\n" in text[:4096] else "\n")
    w.writerow(rows[0])
    for r in rows[1:]:
        for i in at:
            if i < len(r) and r[i] not in ("", "nan", "NaN"):
                r[i] = repr(round(float(r[i]), NS_DIGITS))
        w.writerow(r)
    return out.getvalue()


def run_metrics(folder: Path) -> dict:
    """A run folder's numbers as analysis.metrics.summarize gives them (requests, steps, decisions), at the
    fidelity checks' default SLO."""
    from analysis.fidelity import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS
    from analysis.metrics import Slo, summarize
    from traces.run_folder import load_run

    run = load_run(folder)
    got = summarize(run.requests, Slo(DEFAULT_SLO_TTFT_MS / 1e3, DEFAULT_SLO_TPOT_MS / 1e3), steps=run.steps,
                    decisions=run.decisions)
    return {k: v for k, v in got.items() if isinstance(v, (int, float))}


def _largest_change(before: dict, after: dict) -> float:
    worst = 0.0
    for k, a in before.items():
        b = after.get(k)
        if b is None or (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b)):
            continue
        worst = max(worst, abs(b - a) / abs(a) if a else abs(b - a))
    return worst


def compact(archive: Path, tolerance: float, dry_run: bool = False) -> dict:
    """Rewrite `archive` in place (same member order, names and modes); returns its sizes and the largest
    relative change of any run folder's metric."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    changed, new_members = 0, []
    for m, data in members:
        table = TABLES.get(Path(m.name).stem) if data is not None and m.name.endswith(".csv") else None
        if table is not None:
            new = round_table(data.decode(), table).encode()
            changed += new != data
            data = new
        new_members.append((m, data))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for tag, group in (("before", members), ("after", new_members)):
            root = Path(tmp) / tag
            for m, data in group:
                if data is not None:
                    (root / m.name).parent.mkdir(parents=True, exist_ok=True)
                    (root / m.name).write_bytes(data)
        for req in sorted((Path(tmp) / "before").rglob("requests.csv")):
            folder = req.parent.relative_to(Path(tmp) / "before")
            if not (req.parent / "steps.csv").exists():
                continue
            worst = max(worst, _largest_change(run_metrics(Path(tmp) / "before" / folder),
                                               run_metrics(Path(tmp) / "after" / folder)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in new_members:
            if data is not None:
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    packed = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
    result = dict(archive=str(archive), csvs_changed=changed, bytes_before=archive.stat().st_size,
                  bytes_after=len(packed), largest_metric_change=worst, written=False)
    if worst <= tolerance and not dry_run and len(packed) < result["bytes_before"]:
        archive.write_bytes(packed)
        result["written"] = True
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archives", nargs="+", type=Path, help="tar.xz archives of run folders (rewritten in place)")
    ap.add_argument("--tolerance", type=float, default=1e-6,
                    help="largest relative change of a run's summary number allowed (default 1e-6)")
    ap.add_argument("--dry-run", action="store_true", help="report the sizes, write nothing")
    args = ap.parse_args(argv)
    total = [0, 0]
    for path in args.archives:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        r = compact(path, args.tolerance, args.dry_run)
        total[0] += r["bytes_before"]
        total[1] += r["bytes_after"] if r["written"] else r["bytes_before"]
        print(f"{path.name}: {r['bytes_before'] / 1e6:.2f} -> {r['bytes_after'] / 1e6:.2f} MB, {r['csvs_changed']} CSVs, "
              f"largest metric change {r['largest_metric_change']:.1e}{'' if r['written'] else ' (not written)'}",
              flush=True)
    print(f"total {total[0] / 1e6:.1f} -> {total[1] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
