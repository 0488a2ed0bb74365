"""python -m sim.run: simulate one serving policy on a workload and write a run folder.

    python -m sim.run --policy adaptive                       # synthetic Azure-conv-like load, h100x2, qwen3-0.6b
    python -m sim.run --policy pd --workload ../shared/traces/AzureLLMInferenceTrace_conv.csv --rate-scale 4
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from analysis.metrics import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS
from policies import PRESETS, Capabilities, load_policy_config
from policies.specs import HARDWARE, MODELS, hardware_spec, model_spec
from traces.schema import DECISIONS, REQUESTS, STEPS
from traces.workload import Workload, WorkloadError, make_workload

from .calibrated import KINDS, pick_profile
from .cost_model import make_cost_model
from .engine import Fault, SimConfig, Simulation


@dataclass(slots=True)
class SimResult:
    requests: list[tuple]
    steps: list[tuple]
    decisions: list[tuple]
    summary: dict
    sim_wall_s: float  # the simulation alone, without workload loading or writing
    run_info: dict


def simulate(workload: Workload, *, policy: str = "adaptive", hardware: str = "h100x2", model: str = "qwen3-0.6b",
             config_path: str | None = None, overrides: dict | None = None, sim_config: SimConfig | None = None,
             slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS, slo_tpot_ms: float = DEFAULT_SLO_TPOT_MS,
             progress: bool = False, summarize_steps: bool = True, cost_model: str = "auto",
             profile: str | Path | None = None, split_step_sms: int = 0, seed: int | None = None) -> SimResult:
    """Run one simulation in-process (what sim.run, sim.sweep and the benchmarks call).

    cost_model "auto" uses `profile`, else traces/profiles/<hardware>-<model>.csv when it exists,
    else the analytic model; "analytic" and "calibrated" force one (see `pick_profile`).
    split_step_sms: GPU1 splits offered in steps of this many SMs, as real.run --split-step (0: the
    hardware's green-context granularity). seed: seeds the step-time draws (replaces sim_config's)."""
    from analysis import Slo, summarize

    hw, spec = hardware_spec(hardware).with_split_step(split_step_sms), model_spec(model)
    pcfg = load_policy_config(policy, config_path, overrides)
    cfg = sim_config or SimConfig(capabilities=Capabilities(num_gpus=hw.num_gpus))
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    profile_path = pick_profile(hardware, model, cost_model, profile)
    cost = make_cost_model(hw, spec, "calibrated", profile_path) if profile_path else make_cost_model(hw, spec)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload.requests), unit="req", desc=f"sim {policy}", leave=False, mininterval=0.5)
    t0 = time.perf_counter()
    sim = Simulation(workload.requests, pcfg, cost, hw, spec, cfg, progress=bar).run()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    requests = [r.as_row() for r in sim.ctl.requests]
    decisions = [d.as_row() for d in sim.ctl.decisions]
    import pandas as pd

    slo = Slo(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3)
    summary = summarize(pd.DataFrame(requests, columns=REQUESTS.names), slo,
                        steps=pd.DataFrame(sim.steps, columns=STEPS.names) if summarize_steps else None,
                        decisions=pd.DataFrame(decisions, columns=DECISIONS.names))
    summary.update(policy=policy, final_mode=sim.ctl.mode, sim_wall_s=round(wall, 3))
    run_info = dict(backend="sim", policy=policy, policy_config=pcfg.to_dict(), hardware=hw.to_dict(),
                    model=spec.to_dict(), cost_model=getattr(cost, "name", type(cost).__name__),
                    cost_model_profile=str(profile_path) if profile_path else None,
                    cost_model_sources=getattr(cost, "sources", None), profile_meta=getattr(cost, "meta", None),
                    sim_config=dict(gpu_memory_utilization=cfg.gpu_memory_utilization,
                                    max_merged_steps=cfg.max_merged_steps, kv_blocks=cfg.kv_blocks,
                                    seed=cfg.seed, step_variability=cfg.step_variability,
                                    step_times_drawn=sim.draws_step_times,
                                    capabilities=dict(num_gpus=cfg.capabilities.num_gpus, p2p=cfg.capabilities.p2p,
                                                      green_contexts=cfg.capabilities.green_contexts),
                                    faults=[(f.t_s, f.kind, f.duration_s) for f in cfg.faults]),
                    kv_blocks_per_gpu=sim.ctl.scheduler.pools["gpu0"].num_blocks,
                    workload=dict(source=workload.source, format=workload.format, requests=len(workload.requests),
                                  skipped_rows=workload.skipped_rows, notes=workload.notes),
                    slo=dict(ttft_ms=slo_ttft_ms, tpot_ms=slo_tpot_ms))
    return SimResult(requests, sim.steps, decisions, summary, wall, run_info)


def parse_fault(text: str) -> Fault:
    """T:KIND[:DURATION], e.g. 30:green_ctx, 60:link:20, 5:transfer."""
    parts = text.split(":")
    kinds = ("green_ctx", "link", "transfer", "device")
    try:
        t = float(parts[0])
        kind = parts[1]
        dur = float(parts[2]) if len(parts) > 2 else 0.0
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"bad fault {text!r}: expected T:KIND[:DURATION], e.g. 60:link:20") from None
    if kind not in kinds:
        raise argparse.ArgumentTypeError(f"bad fault kind {kind!r}: one of {', '.join(kinds)}")
    return Fault(t, kind, dur)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.run",
        description="Simulate LLM serving on two GPUs (GPU0 prefill, NVLink KV copy, GPU1 decode with an "
                    "optional attention/FFN SM split) under one policy; print a summary and write a run folder "
                    "(requests.csv, steps.csv, decisions.csv, run.json, summary.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", default="adaptive", choices=PRESETS,
                   help="single: one GPU colocated; dp: two independent GPUs; pd: prefill GPU0 / decode GPU1; "
                        "pipeline: pd + static attention/FFN split on GPU1; adaptive: pd + rebalancer, "
                        "back-pressure and fallback")
    p.add_argument("--workload", default="synthetic",
                   help="'synthetic' (Azure-conv-like Poisson/gamma arrivals) or a trace file: Azure CSV, "
                        "Mooncake JSONL, Vidur/Splitwise CSV (format detected from content)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests to simulate (synthetic default 1000; a file: all, or its first N)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate by this")
    p.add_argument("--hardware", default="h100x2", choices=sorted(HARDWARE))
    p.add_argument("--model", default="qwen3-0.6b", choices=[m for m in MODELS if m != "tiny"])
    p.add_argument("--config", default=None, metavar="YAML", help="override any policy parameter, by section")
    p.add_argument("--attn-sms", type=int, default=None, help="static attention SMs for --policy pipeline")
    p.add_argument("--split-step", type=int, default=0,
                   help="offer GPU1 splits in steps of this many SMs, as real.run --split-step (0: the hardware's "
                        "green-context granularity)")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<time>-<policy>/)")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the synthetic workload and the step-time draws (same seed, same result)")
    p.add_argument("--no-step-variability", action="store_true",
                   help="every step takes its mean time, even where the profile measured the spread of step times")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS, help="time-to-first-token SLO")
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS, help="time-per-output-token SLO")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed trace rows")
    p.add_argument("--max-context-tokens", type=int, default=None,
                   help="drop or clip requests whose prompt+output exceed this")
    p.add_argument("--context-policy", choices=("drop", "clip"), default="drop")
    p.add_argument("--gpus", type=int, default=None, choices=(1, 2), help="GPUs present (default: the hardware's)")
    p.add_argument("--no-p2p", action="store_true", help="model a node without GPU0->GPU1 peer access")
    p.add_argument("--no-green-contexts", action="store_true", help="model a GPU without green contexts")
    p.add_argument("--fault", type=parse_fault, action="append", default=[], metavar="T:KIND[:DUR]",
                   help="inject a failure at T seconds: green_ctx, link (for DUR s), transfer (next copy fails)")
    add_cost_model_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_cost_model_flags(p: argparse.ArgumentParser) -> None:
    """--cost-model and --profile, shared with sim.sweep."""
    p.add_argument("--cost-model", choices=KINDS, default="auto",
                   help="stage times: 'calibrated' interpolates a measured profile (python -m real.profile), "
                        "falling back to the analytic roofline for what it lacks; 'analytic' is the roofline alone; "
                        "'auto' uses --profile, else traces/profiles/<hardware>-<model>.csv when it exists, "
                        "else analytic")
    p.add_argument("--profile", default=None, metavar="CSV",
                   help="measured profile to calibrate from (traces/profile.py format; implies calibrated)")


def cost_model_line(hardware: str, model: str, kind: str, profile) -> str:
    """The one line saying which cost model a run uses (also validates the choice)."""
    path = pick_profile(hardware, model, kind, profile)
    if path is not None:
        return f"cost model: calibrated from {_short(path)}" + _engine_note(path)
    if kind == "analytic":
        return "cost model: analytic (--cost-model analytic)"
    from traces.profile import default_profile_path

    return f"cost model: analytic (no {_short(default_profile_path(hardware, model))})"


def _engine_note(path) -> str:
    """Says when the profile cannot model the real engine's per-step overhead (sim/overhead.py) or its
    spread (sim/variability.py)."""
    from traces.profile import ENGINE_OPS, SPREAD_COLUMNS, read_profile

    df, meta = read_profile(path)
    merged = meta.get("merge") or {}
    pooled = f"; each shape the median of {len(merged['profiles'])} profiles" if merged.get("profiles") else ""
    graft = meta.get("extend") or {}
    while graft:  # traces.profile extend, latest first: shapes other profiles measured (the default's decode_tail rows)
        grafted = graft.get("scaled") or []
        if grafted:
            ops = sorted({g.get("op", "?") for g in grafted})
            pooled += f"; {len(grafted)} {'/'.join(ops)} shapes grafted from {Path(graft['extra']['path']).name}"
        graft = (graft.get("base") or {}).get("extend") or {}
    if set(df["op"]) & set(ENGINE_OPS):
        spread = df[list(SPREAD_COLUMNS)].notna().all(axis=1).any()
        periods = ""
        if "engine_prefill" in set(df["op"]) and not (meta.get("engine_rows") or {}).get("prefill_cost"):
            # rows written before real/engine_profile.py timed a prefill as its step + the launch gap
            periods = ("; its engine_prefill rows are launch-to-launch periods, an older method that reads TTFT "
                       "high (+17..+23% on 2x H100 against the 2026-11-28 engine): re-profile with python -m real.profile")
        return (" (with the engine's per-step overhead" + (" and its measured spread" if spread else "; no spread")
                + pooled + periods + ")")
    return " (no engine_* rows: isolated runner steps, no engine overhead" + pooled + ")"


def _short(path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from traces.run_folder import default_run_dir

    out = None if args.no_write else (Path(args.out) if args.out else default_run_dir(args.policy))
    if out is not None and out.exists() and not out.is_dir():
        print(f"error: --out {out}: exists and is not a folder", file=sys.stderr)
        return 2
    try:
        workload = make_workload(args.workload, num_requests=args.num_requests, rate_scale=args.rate_scale,
                                 seed=args.seed, skip_bad_rows=args.skip_bad_rows,
                                 max_context_tokens=args.max_context_tokens, context_policy=args.context_policy)
        hw = hardware_spec(args.hardware)
        caps = Capabilities(num_gpus=args.gpus or hw.num_gpus, p2p=not args.no_p2p,
                            green_contexts=not args.no_green_contexts)
        overrides = {"attn_sms": args.attn_sms} if args.attn_sms is not None else None
        print(cost_model_line(args.hardware, args.model, args.cost_model, args.profile), flush=True)
        result = simulate(workload, policy=args.policy, hardware=args.hardware, model=args.model,
                          config_path=args.config, overrides=overrides,
                          sim_config=SimConfig(capabilities=caps, faults=args.fault, seed=args.seed,
                                               step_variability=not args.no_step_variability),
                          slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                          progress=not args.quiet and sys.stderr.isatty(), cost_model=args.cost_model,
                          profile=args.profile, split_step_sms=args.split_step)
    except (WorkloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from analysis import format_summary
    from traces.run_folder import git_commit, versions, write_run

    title = (f"sim: {args.policy} on {args.hardware} + {args.model}, {len(workload.requests)} requests "
             f"({workload.source}, rate x{args.rate_scale:g})")
    print(format_summary(result.summary, title))
    print(f"simulated in {result.sim_wall_s:.2f} s wall; final mode {result.summary['final_mode']}")
    if out is not None:
        info = dict(result.run_info, seed=args.seed, command=" ".join(["python -m sim.run"] + (argv or sys.argv[1:])),
                    git_commit=git_commit(), versions=versions("simpy", "numpy", "pandas"))
        try:
            write_run(out, requests=result.requests, steps=result.steps, decisions=result.decisions,
                      run_info=info, summary=result.summary)
        except OSError as e:
            print(f"error: cannot write the run folder {out}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {out}/ (requests.csv, steps.csv, decisions.csv, run.json, summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
