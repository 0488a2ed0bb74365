"""Pipeline's big steps, served against modelled, one row per machine (issue 6). CPU only.

    python bench/overhead_by_machine.py --runs s24=bench/results/profile_h200x2-qwen3-0.6b_session24.csv:\
bench/results/fidelity_runs_NVIDIA_H200_session24.tar.xz [--runs ...] --out OUT.json

For each run set (a machine's own profile and its real runs), the pipeline run's pipelined GPU1 steps of
`--lo`..`--hi` sequences (default 129-256): the median of what they ran over the simulator's isolated step + tail
+ KV copies (served extra) and of the engine overhead the simulator charges them (fidelity_diagnose.
gpu1_step_frame), and the difference. Why: across six 2x H200 machines (sessions 19-24) pipeline's TPOT error rose
with that difference, in the same order on all six; the overhead is an engine row less an isolated step timed in another process, whose
speed differs by 3.5-11% (0.4-1 ms of a 10 ms step at batch 256). Each set's fidelity error is in its committed
fidelity_NVIDIA_<gpu>_<set>.json; `--fidelity NAME=JSON` copies pipeline's TPOT mean error beside the row.
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


def big_step_overhead(run: Path, cost, lo: int = 129, hi: int = 256) -> dict:
    """Medians (ms) over the run's pipelined one-step GPU1 rows of lo..hi sequences."""
    from fidelity_diagnose import gpu1_step_frame

    g = gpu1_step_frame(run, cost)
    g = g[(g.attn_sms > 0) & (g.num_steps == 1) & (g.b >= lo) & (g.b <= hi)]
    extra = (g.real - g.iso_s - g.tail_s - g.copy_s) * 1e3
    served, modelled = float(extra.median()), float(g.overhead_s.median() * 1e3)
    return dict(steps=len(g), served_extra_ms=round(served, 3), modelled_overhead_ms=round(modelled, 3),
                modelled_minus_served_ms=round(modelled - served, 3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", action="append", required=True, metavar="NAME=PROFILE:ARCHIVE",
                    help="a run set: its machine's own profile and its fidelity_bench archive (the pipeline run)")
    ap.add_argument("--fidelity", action="append", default=[], metavar="NAME=JSON",
                    help="the set's committed fidelity_bench sim JSON: its pipeline TPOT mean error is copied")
    ap.add_argument("--lo", type=int, default=129)
    ap.add_argument("--hi", type=int, default=256)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from fidelity_bench import extract_runs
    from sim.cost_model import make_cost_model

    fidelity = dict(item.split("=", 1) for item in args.fidelity)
    rows = {}
    for item in args.runs:
        name, _, rest = item.partition("=")
        profile, _, archive = rest.partition(":")
        if not name or not profile or not archive:
            ap.error(f"--runs {item!r}: give NAME=PROFILE:ARCHIVE")
        runs = [r for r in extract_runs(Path(archive), Path(tempfile.mkdtemp(prefix="overhead-")))
                if json.loads((r / "run.json").read_text()).get("policy") == "pipeline"]
        if not runs:
            ap.error(f"{archive}: no pipeline run")
        info = json.loads((runs[0] / "run.json").read_text())
        hardware = "h200x2" if "H200" in info["hardware"]["device"] else "h100x2"
        cost = make_cost_model(hardware, args.model, kind="calibrated", profile=profile)
        rows[name] = dict(profile=profile, archive=archive, **big_step_overhead(runs[0], cost, args.lo, args.hi))
        if name in fidelity:
            rows[name]["pipeline_tpot_mean_rel_err"] = json.loads(Path(fidelity[name]).read_text())[
                "mean_rel_err"]["tpot/pipeline"]
        r = rows[name]
        print(f"{name:>6}: {r['steps']:5d} steps, served extra {r['served_extra_ms']:+.2f} ms, modelled overhead "
              f"{r['modelled_overhead_ms']:+.2f} ms, modelled - served {r['modelled_minus_served_ms']:+.2f} ms"
              + (f", pipeline TPOT error {100 * r['pipeline_tpot_mean_rel_err']:+.1f}%"
                 if "pipeline_tpot_mean_rel_err" in r else ""))
    Path(args.out).write_text(json.dumps(dict(date=date.today().isoformat(), command=" ".join(sys.argv),
                                              batches=[args.lo, args.hi], run_sets=rows), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
