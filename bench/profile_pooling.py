"""Which profile predicts a machine's real runs best: its own, another machine's, or the median of several
(issue 6). CPU only: it re-simulates committed real runs (fidelity_bench.py sim) under each profile.

    python bench/profile_pooling.py \
        --profile m1=bench/results/profile_A.csv --profile m2=bench/results/profile_B.csv [...] \
        --runs conv_m1=m1:bench/results/runs_A.tar.xz+bench/results/runs_A_r2.tar.xz:TRACE \
        --runs conv_m3=-:bench/results/runs_C.tar.xz:TRACE [...] --out bench/results/profile_pooling_<gpu>.json

Each --runs names a run set (one machine's real runs, several archives = replicates), the profile measured
on that machine (`-`: none) and the trace. Each set is simulated with
  own            the profile of its machine,
  other:NAME     each other machine's profile alone (what a user gets from one profile of another machine),
  pooled_others  the per-shape median of the other machines' profiles (traces.profile.merge_profiles),
  pooled_all     the median of every profile, its own machine's included,
and the summary gives, per trace and variant, the mean and worst |relative error| of each metric over the
sets and policies. Why: a profile is one process on one machine, and GPUs' speed moves from process to
process and machine to machine; whether a pooled profile beats a single one is a measured question.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METRICS = ("ttft_mean_ms", "tpot_mean_ms", "ttft_p99_ms", "tpot_p99_ms", "output_tok_s")


def parse_named(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} {item!r}: give NAME=VALUE")
        if name in out:
            raise SystemExit(f"{what} {name!r} given twice")
        out[name] = value
    return out


def parse_runs(items: list[str], profiles: dict) -> dict[str, dict]:
    sets = {}
    for name, value in parse_named(items, "--runs").items():
        parts = value.split(":")
        if len(parts) != 3:
            raise SystemExit(f"--runs {name}: give NAME=MACHINE:TGZ[+TGZ...]:TRACE")
        machine, archives, trace = parts
        if machine != "-" and machine not in profiles:
            raise SystemExit(f"--runs {name}: no --profile named {machine!r} (have {sorted(profiles)})")
        paths = archives.split("+")
        for p in paths + [trace]:
            if not Path(p).exists():
                raise SystemExit(f"--runs {name}: {p} does not exist")
        sets[name] = dict(machine=None if machine == "-" else machine, archives=paths, trace=trace)
    return sets


def variants(machine: str | None, profiles: dict, merged: dict, each_other: bool = True,
             fixed: dict | None = None) -> dict[str, str]:
    """variant name -> profile path for a run set of `machine` (each_other=False: no other:NAME variants), plus
    fixed:NAME for each of `fixed` (one profile for every set, such as a default and a candidate)."""
    fixed_variants = {f"fixed:{n}": p for n, p in (fixed or {}).items()}
    if not profiles:
        return fixed_variants
    out = {"own": profiles[machine]} if machine else {}
    others = [n for n in profiles if n != machine]
    if each_other:
        out.update({f"other:{n}": profiles[n] for n in others})
    if machine and len(others) >= 2:
        out["pooled_others"] = merged[f"without:{machine}"]
    if machine is None and len(others) >= 2:
        out["pooled_others"] = merged["all"]  # no own profile: every profile is another machine's
    out["pooled_all"] = merged["all"]
    return {**out, **fixed_variants}


def merge_all(profiles: dict, folder: Path) -> dict[str, str]:
    from traces.profile import merge_profiles, write_profile

    merged = {}
    for key, names in [("all", list(profiles))] + [(f"without:{m}", [n for n in profiles if n != m])
                                                   for m in profiles]:
        if len(names) < 2:
            continue
        rows, meta = merge_profiles([profiles[n] for n in names])
        path = folder / f"merged_{key.replace(':', '_')}.csv"
        write_profile(path, rows, meta)
        merged[key] = str(path)
    return merged


def simulate(archives: list[str], trace: str, profile: str, seeds: int, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench/fidelity_bench.py"), "sim", *archives, "--trace", trace,
           "--profile", profile, "--seeds", str(seeds), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    return {p["policy"]: {m: p["rel_err"][m] for m in METRICS} for p in result["pairs"]}


def summarize(results: dict, sets: dict) -> dict:
    """Per trace and variant kind (other:NAME counted as `other`): mean and max |error| of each metric over
    every (set, policy, and for `other`, profile), with and without policy single."""
    out = {}
    for set_name, by_variant in results.items():
        trace = Path(sets[set_name]["trace"]).stem
        for variant, by_policy in by_variant.items():
            kind = variant if variant.startswith("fixed:") else variant.split(":")[0]
            for policy, errs in by_policy.items():
                for scope in ("all_policies", "without_single"):
                    if scope == "without_single" and policy == "single":
                        continue
                    cell = out.setdefault(trace, {}).setdefault(kind, {}).setdefault(scope, {m: [] for m in METRICS})
                    for m in METRICS:
                        cell[m].append(errs[m])
    for trace in out.values():
        for kind in trace.values():
            for scope, cell in kind.items():
                kind[scope] = {"n": len(cell[METRICS[0]]),
                               "mean_abs_err": {m: sum(abs(v) for v in vs) / len(vs) for m, vs in cell.items()},
                               "max_abs_err": {m: max(abs(v) for v in vs) for m, vs in cell.items()},
                               "mean_err": {m: sum(vs) / len(vs) for m, vs in cell.items()}}
    return out


def table(summary: dict) -> str:
    short = {"ttft_mean_ms": "TTFT mean", "tpot_mean_ms": "TPOT mean", "ttft_p99_ms": "TTFT p99",
             "tpot_p99_ms": "TPOT p99", "output_tok_s": "tok/s"}
    lines = []
    for trace, kinds in summary.items():
        for scope in ("without_single", "all_policies"):
            lines.append(f"\n{trace}, {scope.replace('_', ' ')}: mean |error| (worst), %")
            lines.append(f"{'profile':14s} {'n':>3s} " + " ".join(f"{short[m]:>15s}" for m in METRICS))
            for kind, cells in kinds.items():
                c = cells.get(scope)
                if c:
                    lines.append(f"{kind:14s} {c['n']:3d} " + " ".join(
                        f"{100 * c['mean_abs_err'][m]:6.1f} ({100 * c['max_abs_err'][m]:5.1f})" for m in METRICS))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="append", default=[], metavar="NAME=CSV",
                    help="a machine's profile (at least 2, unless only --fixed profiles are compared)")
    ap.add_argument("--fixed", action="append", default=[], metavar="NAME=CSV",
                    help="a profile simulated for every run set, variant fixed:NAME (a default, a candidate)")
    ap.add_argument("--runs", action="append", required=True, metavar="NAME=MACHINE:TGZ[+TGZ]:TRACE",
                    help="a run set: the machine it ran on (a --profile name, or - for none), its archives, the trace")
    ap.add_argument("--seeds", type=int, default=4, help="fidelity_bench.py sim --seeds (default 4)")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at a time")
    ap.add_argument("--no-each-other", action="store_true",
                    help="skip the other:NAME variants (each other machine's profile alone): own and pooled only, "
                         "a fraction of the simulations")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profiles = parse_named(args.profile, "--profile") if args.profile else {}
    fixed = parse_named(args.fixed, "--fixed") if args.fixed else {}
    if len(profiles) == 1 or not (profiles or fixed):
        ap.error("give at least 2 --profile, or --fixed profiles only")
    for flag, named in (("--profile", profiles), ("--fixed", fixed)):
        for name, path in named.items():
            if not Path(path).exists():
                ap.error(f"{flag} {name}: {path} does not exist")
    sets = parse_runs(args.runs, profiles)
    work = Path(tempfile.mkdtemp(prefix="pooling-"))
    merged = merge_all(profiles, work) if profiles else {}
    wanted = {s: variants(spec["machine"], profiles, merged, not args.no_each_other, fixed) for s, spec in sets.items()}
    jobs = sorted({(s, p) for s, by_variant in wanted.items() for p in by_variant.values()})  # a profile once a set
    print(f"{len(jobs)} simulations of {len(sets)} run sets, {args.jobs} at a time", flush=True)

    def one(job):
        s, p = job
        got = simulate(sets[s]["archives"], sets[s]["trace"], p, args.seeds, work / f"{s}_{jobs.index(job)}.json")
        names = ", ".join(v for v, q in wanted[s].items() if q == p)
        print(f"  {s:18s} {names:18s} " + " | ".join(
            f"{pol[:4]} " + "/".join(f"{100 * e[m]:+.1f}" for m in METRICS[:4]) for pol, e in got.items()), flush=True)
        return job, got

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        got = dict(pool.map(one, jobs))
    results = {s: {v: got[s, p] for v, p in by_variant.items()} for s, by_variant in wanted.items()}
    summary = summarize(results, sets)
    print(table(summary))
    out = {"date": date.today().isoformat(), "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "gpu": sorted({json.loads(Path(p).with_suffix(".json").read_text()).get("gpu", "?")
                          for p in [*profiles.values(), *fixed.values()]}),
           "profiles": profiles, "fixed": fixed, "run_sets": sets, "metrics": list(METRICS),
           "note": "rel_err = sim / real - 1 against the replicates' mean; variants: own, other:NAME, pooled_others, "
                   "pooled_all, fixed:NAME (bench/profile_pooling.py docstring)",
           "rel_err": results, "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
