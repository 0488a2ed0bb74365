"""Simulator speed: the whole Azure conv trace (19,366 requests) under each policy, one CPU core.

Times `python -m sim.run --policy P --workload <trace> --out <tmp>` end to end (interpreter start,
imports, loading, simulating, summarising, writing the run folder), pinned to one core with
taskset when available, best of --repeat runs. Goal (issue 2): <= 5 s wall per policy on one core
of the 2-core CI machines; Vidur takes about 28 s for 10,000 requests there.

Each policy runs with the default cost model (the committed calibrated profile for h100x2 + qwen3-0.6b:
per-step engine overhead by the other GPU's state and drawn step spread) and, for comparison, with
`--cost-model analytic` (the roofline alone: fewer events, no draws), as the first measurement did.

    python bench/sim_speed.py [--trace PATH] [--repeat 3] [--out bench/results/sim_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared/traces/AzureLLMInferenceTrace_conv.csv"
POLICIES = ("single", "dp", "pd", "pipeline", "adaptive")
GOAL_S = 5.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_policy(policy: str, extra: list[str], args, pin: list[str], out_base: Path) -> tuple[dict, str] | None:
    """Best of --repeat end-to-end runs of one policy (None if a run fails), and sim.run's cost-model line."""
    walls, sim_walls = [], []
    for i in range(args.repeat):
        out = out_base.with_name(f"{out_base.name}-{i}")
        cmd = pin + [sys.executable, "-m", "sim.run", "--policy", policy, "--workload", args.trace, "--quiet",
                     "--out", str(out)] + extra
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return None
        summary = json.loads((out / "summary.json").read_text())
        sim_walls.append(summary["sim_wall_s"])
    line = next((ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("cost model")), "?")
    steps = sum(1 for _ in open(out / "steps.csv")) - 1
    return dict(wall_s=round(min(walls), 3), sim_only_s=round(min(sim_walls), 3), requests=summary["requests"],
                finished=summary["finished"], step_rows=steps, meets_goal=min(walls) <= GOAL_S), line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--out", default=str(ROOT / "bench/results/sim_speed.json"))
    args = ap.parse_args()
    if not Path(args.trace).is_file():
        print(f"error: {args.trace}: trace not found (it lives in ../shared/traces)", file=sys.stderr)
        return 2
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    results, cost_models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies:
            for variant, extra in (("default", []), ("analytic", ["--cost-model", "analytic"])):
                got = time_policy(policy, extra, args, pin, Path(tmp) / f"{policy}-{variant}")
                if got is None:
                    return 1
                r, cost_models[variant] = got
                results.setdefault(policy, {}).update(r if variant == "default" else {"analytic_cost_model": r})
                print(f"{policy:9s} {variant:8s} {r['wall_s']:6.2f} s wall (simulation alone {r['sim_only_s']:.2f} s), "
                      f"{r['requests']} requests, {r['step_rows']} step rows, {'meets' if r['meets_goal'] else 'MISSES'} "
                      f"the {GOAL_S:.0f} s goal", flush=True)
    record = dict(benchmark="sim_speed", date=date.today().isoformat(), cpu=cpu_name(), cores_used=1 if pin else os.cpu_count(),
                  python=platform.python_version(), trace=Path(args.trace).name, repeat=args.repeat,
                  command="python bench/sim_speed.py", goal_s=GOAL_S, vidur_reference="28 s for 10,000 requests",
                  cost_models=cost_models, results=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
