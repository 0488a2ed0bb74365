"""Each profile's model of each real run's steps at their own shapes (issue 6): model / real seconds by batch bin.

    python bench/model_at_shape.py RUNS.tgz [RUNS_r2.tgz ...] --profile A.csv [--profile B.csv ...] \
        [--out bench/results/model_at_shape_<name>.json]

For every run in the archives (all policies, every round) and every profile: GPU1 decode steps through
fidelity_diagnose.decode_at_shape (sequential and pipelined, by batch), a colocated run's GPU0 steps through
colocated_at_shape (decode and mixed, by decode batch). No queueing feedback: what a profile change does to the
cost of the steps that were served, round by round, before the simulator turns it into TTFT and TPOT. Quick
(seconds a run), where fidelity_diagnose re-simulates and takes minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def runs_in(archives: list[str]) -> list[tuple[str, Path]]:
    """(name, folder) of each run of fidelity_bench archives, extracted to a temporary folder, in archive order;
    the name is the run folder's, prefixed with its archive's stem when several archives are given (two
    machines' archives both hold a folder named `pd`)."""
    from fidelity_bench import extract_runs

    work = Path(tempfile.mkdtemp(prefix="model-at-shape-"))
    out = []
    for i, archive in enumerate(archives):
        prefix = f"{Path(archive).name.split('.')[0]}/" if len(archives) > 1 else ""
        out += [(prefix + run.name, run) for run in extract_runs(archive, work / str(i))]
    return out


def model_over_real(run: Path, cost) -> dict[str, float]:
    """{"<kind> <batch bin>": model / real seconds} for one run (kind: sequential / pipelined on GPU1, or
    decode / mixed on GPU0 for a colocated run)."""
    from fidelity_diagnose import _has_gpu1_decode, colocated_at_shape, decode_at_shape

    table = decode_at_shape(run, cost) if _has_gpu1_decode(run) else colocated_at_shape(run, cost)[0]
    return {f"{kind} {b}": round(float(v), 4) for (kind, b), v in table.model_over_real.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archives", nargs="+", help="fidelity_bench real archives (.tgz)")
    ap.add_argument("--profile", action="append", required=True, help="a profile CSV (repeat to compare)")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--out", default=None, help="JSON of every run x profile (default: print only)")
    args = ap.parse_args(argv)
    from sim.cost_model import make_cost_model

    runs = runs_in(args.archives)
    results = {}
    for profile in args.profile:
        info = json.loads((runs[0][1] / "run.json").read_text())
        hardware = "h200x2" if "H200" in info["hardware"]["device"] else "h100x2"
        cost = make_cost_model(hardware, args.model, kind="calibrated", profile=profile)
        results[profile] = {}
        for name, run in runs:
            got = model_over_real(run, cost)
            results[profile][name] = got
            print(f"{Path(profile).stem:>48} {name:>12}  " + "  ".join(
                f"{k.replace('sequential', 'seq').replace('pipelined', 'pipe')} {v:.3f}" for k, v in got.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(date=date.today().isoformat(), command=" ".join(sys.argv),
                                                  archives=args.archives, model_over_real=results), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
