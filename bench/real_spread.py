"""How far real runs of one configuration differ from machine to machine: the error floor of any simulator that,
like ours by default, predicts one number for every machine of a kind (issue 6).

Each run set is one machine's runs of one workload (several archives: that machine's rounds, averaged per policy,
as analysis.fidelity compares replicates). For each workload, policy and metric, every machine's value is set
against the mean of the OTHER machines' values (leave one out): that mean is what a perfect machine-independent
model calibrated on the other machines would predict, and its relative error, (others' mean - this machine) /
this machine, is the simulator's convention. The fractions within the issue's goals (means 3%, p99s 8%) say how
often even that predictor meets them. With --sim-errors (bench/profile_pooling.py's JSON) the simulator's errors
on the same sets stand beside it.

    python bench/real_spread.py conv_s18=A.tar.xz conv_s17=B.tar.xz,B_r2.tar.xz heldout_s18=C.tar.xz ... \\
        [--sim-errors bench/results/profile_knots_NVIDIA_H200_session20.json --variant fixed:knots] --out OUT.json

A set's workload is its name up to the first "_" (conv_s18 -> conv). Policies are the archive's run folders
(a round suffix such as _r2 is dropped).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tarfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from results_io import write_results  # noqa: E402

METRICS = ("ttft_mean_ms", "tpot_mean_ms", "ttft_p99_ms", "tpot_p99_ms", "output_tok_s")
GOALS = {"ttft_mean_ms": 0.03, "tpot_mean_ms": 0.03, "output_tok_s": 0.03, "ttft_p99_ms": 0.08, "tpot_p99_ms": 0.08}


def archive_values(path: Path) -> dict[str, list[dict]]:
    """policy -> the summary.json of each of its runs in one archive."""
    out: dict[str, list[dict]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.isfile() and parts[-1] == "summary.json" and len(parts) >= 3:
                policy = re.sub(r"_r\d+$", "", parts[-2])
                out.setdefault(policy, []).append(json.load(tar.extractfile(m)))
    return out


def set_values(archives: list[Path]) -> dict[str, dict[str, float]]:
    """policy -> metric -> the mean over this machine's runs of it."""
    runs: dict[str, list[dict]] = {}
    for a in archives:
        for policy, summaries in archive_values(a).items():
            runs.setdefault(policy, []).extend(summaries)
    return {p: {m: statistics.fmean(s[m] for s in ss) for m in METRICS if all(m in s for s in ss)}
            for p, ss in runs.items()}


def leave_one_out(values: dict[str, float]) -> dict[str, float]:
    """set -> (mean of the other sets - this set) / this set; needs at least 2 sets."""
    out = {}
    for name, v in values.items():
        others = [x for n, x in values.items() if n != name]
        if others and v:
            out[name] = (statistics.fmean(others) - v) / v
    return out


def spread(sets: dict[str, dict[str, dict[str, float]]], sim: dict | None = None) -> dict:
    """workload -> policy -> metric -> the machines' values, their spread and the leave-one-out errors (and the
    simulator's errors on the same sets, when given)."""
    out: dict = {}
    by_workload: dict[str, dict] = {}
    for name, policies in sets.items():
        by_workload.setdefault(name.split("_")[0], {})[name] = policies
    for workload, group in sorted(by_workload.items()):
        for policy in sorted({p for pols in group.values() for p in pols}):
            for metric in METRICS:
                values = {n: pols[policy][metric] for n, pols in group.items()
                          if policy in pols and metric in pols[policy]}
                if len(values) < 3:
                    continue
                loo = leave_one_out(values)
                med = statistics.median(values.values())
                cell = dict(machines=len(values), values={n: round(v, 4) for n, v in values.items()},
                            median=med, range_over_median=(max(values.values()) - min(values.values())) / med,
                            loo_rel_err={n: round(e, 5) for n, e in loo.items()},
                            loo_mean_abs=statistics.fmean(abs(e) for e in loo.values()),
                            loo_max_abs=max(abs(e) for e in loo.values()),
                            loo_within_goal=sum(abs(e) <= GOALS[metric] for e in loo.values()) / len(loo),
                            goal=GOALS[metric])
                if sim is not None:
                    errs = {n: sim[n][policy][metric] for n in values if policy in sim.get(n, {})
                            and metric in sim[n][policy]}
                    if errs:
                        cell["sim_rel_err"] = {n: round(e, 5) for n, e in errs.items()}
                        cell["sim_mean_abs"] = statistics.fmean(abs(e) for e in errs.values())
                        cell["sim_within_goal"] = sum(abs(e) <= GOALS[metric] for e in errs.values()) / len(errs)
                        same = [n for n in errs if n in loo]
                        cell["loo_mean_abs_on_sim_sets"] = statistics.fmean(abs(loo[n]) for n in same) if same else None
                out.setdefault(workload, {}).setdefault(policy, {})[metric] = cell
    return out


def table(result: dict) -> str:
    lines = ["workload  policy    metric          machines  range/median  leave-one-out |err| mean/max  within goal"
             + "   sim |err| mean (within goal)"]
    for workload, policies in result.items():
        for policy, metrics in policies.items():
            for metric, c in metrics.items():
                sim = (f"   {100 * c['sim_mean_abs']:5.1f}% ({100 * c['sim_within_goal']:.0f}%)"
                       if "sim_mean_abs" in c else "")
                lines.append(f"{workload:9s} {policy:9s} {metric:15s} {c['machines']:8d}  {100 * c['range_over_median']:11.1f}%"
                             f"  {100 * c['loo_mean_abs']:14.1f}% / {100 * c['loo_max_abs']:5.1f}%"
                             f"  {100 * c['loo_within_goal']:10.0f}%{sim}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", metavar="NAME=ARCHIVE[,ARCHIVE...]",
                    help="one machine's run archives of one workload (NAME's prefix before '_' names the workload)")
    ap.add_argument("--sim-errors", type=Path, default=None,
                    help="bench/profile_pooling.py's JSON: the simulator's errors on (some of) the same sets")
    ap.add_argument("--variant", default=None, help="which of its variants (e.g. fixed:knots); default: the only one")
    ap.add_argument("--gpu", default="NVIDIA H200", help="the GPU the runs were on (recorded in the JSON)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sets, archives = {}, {}
    for item in args.sets:
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            ap.error(f"{item!r}: expected NAME=ARCHIVE[,ARCHIVE...]")
        files = [Path(p) for p in paths.split(",")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            print(f"error: {', '.join(missing)}: no such file", file=sys.stderr)
            return 2
        sets[name], archives[name] = set_values(files), [str(f) for f in files]
    sim = None
    if args.sim_errors:
        rel = json.loads(args.sim_errors.read_text())["rel_err"]
        variants = sorted({v for s in rel.values() for v in s})
        variant = args.variant or (variants[0] if len(variants) == 1 else None)
        if variant not in variants:
            ap.error(f"--variant: one of {', '.join(variants)}")
        sim = {n: s[variant] for n, s in rel.items() if variant in s}
    result = spread(sets, sim)
    print(table(result))
    write_results(args.out, dict(gpu=args.gpu, date=date.today().isoformat(),
                                 command="python bench/real_spread.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                 note=("leave one out: each machine's real value against the mean of the other "
                                       "machines' (the best a model that predicts one number per GPU kind can do); "
                                       "rel_err = (predicted - real) / real, as the fidelity JSONs"),
                                 run_sets=archives, sim_errors=str(args.sim_errors) if args.sim_errors else None,
                                 variant=args.variant, spread=result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
