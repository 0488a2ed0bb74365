"""python -m sim.sweep: what-if grids in parallel, with the goodput of every configuration.

    python -m sim.sweep --policies pd pipeline adaptive --rate-scales 1 2 4 --goodput
    python -m sim.sweep --grid sweep.yaml          # same keys as the flags, e.g. policies: [pd, adaptive]
    python -m sim.sweep --cost-model analytic      # ignore measured profiles in traces/profiles/

A configuration is (policy, hardware, model, static attention SMs); each is simulated at every rate
scale, and with --goodput its goodput is searched: the highest rate scale at which >= 90% of
requests meet both SLOs (DistServe). Writes sweep.csv (one row per run) and goodput.csv.
Stage times come from traces/profiles/<hardware>-<model>.csv when it exists (--profile FILE for
another, --cost-model analytic for the roofline alone); one line per hardware/model says which.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from policies import PRESETS
from policies.specs import HARDWARE, MODELS

from .calibrated import pick_profile
from .cost_model import make_cost_model
from .run import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS, add_cost_model_flags, cost_model_line, simulate


@dataclass(frozen=True, slots=True)
class SweepPoint:
    policy: str
    hardware: str
    model: str
    attn_sms: int  # 0: the policy's default
    workload: str
    num_requests: int | None
    seed: int
    slo_ttft_ms: float
    slo_tpot_ms: float
    config: str | None = None
    cost_model: str = "auto"
    profile: str | None = None

    @property
    def label(self) -> str:
        split = f"@{self.attn_sms}" if self.attn_sms else ""
        return f"{self.policy}{split}/{self.hardware}/{self.model}"


@lru_cache(maxsize=4)
def _workload(spec: str, num_requests: int | None, seed: int):
    from traces.workload import make_workload

    return make_workload(spec, num_requests=num_requests, seed=seed)


def _run(point: SweepPoint, rate_scale: float) -> dict:
    from traces.workload import scale_rate

    base = _workload(point.workload, point.num_requests, point.seed)
    overrides = {"attn_sms": point.attn_sms} if point.attn_sms else None
    res = simulate(scale_rate(base, rate_scale), policy=point.policy, hardware=point.hardware, model=point.model,
                   config_path=point.config, overrides=overrides, slo_ttft_ms=point.slo_ttft_ms,
                   slo_tpot_ms=point.slo_tpot_ms, summarize_steps=True, cost_model=point.cost_model,
                   profile=point.profile, seed=point.seed)
    row = dict(config=point.label, **{k: v for k, v in asdict(point).items() if k != "config"},
               rate_scale=rate_scale, offered_rps=base.rate_rps * rate_scale)
    row.update(res.summary)
    return row


def _goodput(point: SweepPoint, lo: float, hi: float) -> dict:
    from analysis import find_goodput

    runs = {}

    def attainment(scale: float) -> float:
        runs[scale] = _run(point, scale)
        return runs[scale]["slo_attainment"]

    g = find_goodput(attainment, lo=lo, hi=hi)
    base = _workload(point.workload, point.num_requests, point.seed)
    return dict(config=point.label, policy=point.policy, hardware=point.hardware, model=point.model,
                attn_sms=point.attn_sms, goodput_rate_scale=g.rate_scale, goodput_rps=g.rate_scale * base.rate_rps,
                attainment_at_goodput=g.attainment, evaluations=len(g.evaluations))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", metavar="YAML", help="grid file; its keys override the flags below")
    p.add_argument("--policies", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--rate-scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--hardware", nargs="+", default=["h100x2"], choices=sorted(HARDWARE))
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"], choices=[m for m in MODELS if m != "tiny"])
    p.add_argument("--attn-sms", nargs="+", type=int, default=[0],
                   help="static splits to try for the pipeline policy (0 = its default)")
    p.add_argument("--workload", default="synthetic")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the synthetic workload and the step-time draws")
    p.add_argument("--config", default=None, metavar="YAML", help="policy overrides for every run")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS)
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS)
    add_cost_model_flags(p)
    p.add_argument("--goodput", action="store_true", help="also search each configuration's goodput")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--out", default="sweep", metavar="DIR", help="writes DIR/sweep.csv and DIR/goodput.csv")
    return p


def _apply_grid(args: argparse.Namespace) -> None:
    import yaml

    path = Path(args.grid)
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read grid ({e})") from None
    for key, value in grid.items():
        attr = key.replace("-", "_")
        if not hasattr(args, attr) or attr == "grid":
            raise ValueError(f"{path}: unknown key {key!r}")
        setattr(args, attr, value)


def points(args) -> list[SweepPoint]:
    out = []
    for policy, hw, model in itertools.product(args.policies, args.hardware, args.models):
        for attn in (args.attn_sms if policy == "pipeline" else [0]):
            out.append(SweepPoint(policy, hw, model, attn, args.workload, args.num_requests, args.seed,
                                  args.slo_ttft_ms, args.slo_tpot_ms, args.config, args.cost_model, args.profile))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.grid:
            _apply_grid(args)
        _workload(args.workload, args.num_requests, args.seed)  # fail fast on a bad workload
        lines = []
        for hw, model in itertools.product(args.hardware, args.models):  # a bad profile fails here, not in a worker
            path = pick_profile(hw, model, args.cost_model, args.profile)
            if path is not None:
                make_cost_model(hw, model, "calibrated", path)
            lines.append(f"{hw}/{model}: {cost_model_line(hw, model, args.cost_model, args.profile)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import pandas as pd
    from tqdm import tqdm

    print("\n".join(lines))
    grid = points(args)
    scales = sorted(args.rate_scales)
    t0 = time.perf_counter()
    rows, goodputs = [], []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_run, pt, s) for pt in grid for s in scales]
        if args.goodput:
            futures += [pool.submit(_goodput, pt, scales[0], scales[-1]) for pt in grid]
        for fut in tqdm(as_completed(futures), total=len(futures), unit="run", disable=not sys.stderr.isatty()):
            r = fut.result()
            (goodputs if "goodput_rps" in r else rows).append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows).sort_values(["config", "rate_scale"])
    table.to_csv(out / "sweep.csv", index=False)
    cols = ["config", "rate_scale", "throughput_rps", "output_tok_s", "ttft_p99_ms", "tpot_p99_ms",
            "slo_attainment", "final_mode"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if goodputs:
        g = pd.DataFrame(goodputs).sort_values("goodput_rps", ascending=False)
        g.to_csv(out / "goodput.csv", index=False)
        print("\ngoodput (highest rate with >= 90% of requests within both SLOs):")
        print(g[["config", "goodput_rate_scale", "goodput_rps", "attainment_at_goodput"]].to_string(
            index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\n{len(futures)} runs in {time.perf_counter() - t0:.1f} s; wrote {out}/sweep.csv"
          + (f" and {out}/goodput.csv" if goodputs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
