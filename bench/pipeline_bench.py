"""GPU1 attention/FFN pipeline on the real engine (issue 5): step times per split, the overlap ceiling,
and adaptive vs every static configuration.

Run on a 2-GPU node (part 1 uses GPU 0 only) in one call:
    python bench/pipeline_bench.py --trace <Azure conv CSV carried along> --out bench/results/pipeline_<gpu>.json
Smoke test on CPU (tiny model, partitions are no-ops): python bench/pipeline_bench.py --device cpu

Part 1, per model shape and decode batch (1024-token contexts), in CUDA graphs with the engine's fused kernels
(bench/pipeline_diag.py): the sequential step, the pipelined step (2 micro-batches) at each split, and one
layer's ceilings. The like-for-like ceiling is the ideal 2-micro-batch pipeline, seq_layer(B) / (2 x pair(B/2)),
pair = attention of one micro-batch on partition A || FFN of another on partition B; the facts-file one pairs
stages of the whole batch, seq_layer(B) / pair(B). captured = (seq/pipeline - 1) / (ceiling - 1) where the
ceiling exceeds 1.01.
Part 2: Azure conv at three loads (x1000 = every request at once: decode-bound), pd and pipeline at
each split vs adaptive: output tok/s (the ratio the issue asks for), TTFT and TPOT. Each configuration
runs in a process of its own (engines built one after another in one process got slower), after an
untimed warm-up process on GPU (a fresh node's first process compiles kernels while it serves), pd and
adaptive side by side; --pairs 2 repeats them in the reverse order.
"""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.pd_bench import serve  # noqa: E402


def part1(results: dict, models: list[str], split_step: int) -> None:
    """Per model shape and batch (1024-token contexts, all in CUDA graphs with the fused kernels): the sequential
    step, the pipelined step at each split, and the per-layer ceilings (bench/pipeline_diag.py measures them,
    with its kernel-sizing variants and kernel timelines)."""
    from pipeline_diag import BATCHES, diagnose

    diag: dict = {}
    for name in models:
        try:
            diagnose(name, BATCHES[name], split_step, diag)
        except Exception as e:  # keep the other model's numbers
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: failed: {e}", flush=True)
            torch.cuda.empty_cache()
    table = [dict(model=m, batch=int(b), context=1024, **row["summary"])
             for m, rows in diag.items() for b, row in rows.items() if b.isdigit() and "summary" in row]
    results["step_times"] = table
    results["step_diagnosis"] = diag
    for name in ("like_for_like", "facts_file"):
        captured = [r[f"captured_{name}"] for r in table if f"captured_{name}" in r]
        key = "overlap_ceiling_captured_fraction" + ("" if name == "like_for_like" else "_facts_file")
        results[key] = min(captured) if captured else None
        results[key + "_points"] = len(captured)
    ideal = [r["pipeline_over_ideal"] for r in table if "pipeline_over_ideal" in r]
    results["pipeline_over_ideal_min"] = min(ideal) if ideal else None
    results["layer_ceiling_like_for_like_max"] = max((r["ceiling_like_for_like"] for r in table
                                                      if "ceiling_like_for_like" in r), default=None)


SERVING_KEYS = ("finished", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                "slo_attainment")


def serve_config(label: str, device: str, model: str, trace: str | None, n: int, rates: list[float],
                 split_step: int) -> dict:
    """One configuration ("pd", "pipeline@96", "adaptive") served at each rate on one engine, in this
    process: {rate: summary subset}."""
    from analysis import Slo
    from policies import load_policy_config
    from real.config import EngineConfig
    from real.engine import LLMEngine
    from traces.workload import make_workload

    policy, _, attn = label.partition("@")
    w = make_workload(trace or "synthetic", num_requests=n, seed=0)
    pcfg = load_policy_config(policy, overrides={"attn_sms": int(attn)} if attn else None)
    engine = LLMEngine(EngineConfig(model=model, device=device, seed=0, split_step_sms=split_step), policy, pcfg,
                       log=lambda *_: None)
    out = {}
    try:
        for i, rate in enumerate(rates):
            summary, _, _ = serve(engine, w, rate, Slo(1.0, 0.05), seed=0, offset=i * 10**6)
            out[rate] = {k: summary.get(k) for k in SERVING_KEYS}
            print(f"{label:14s} x{rate:<5g} {summary['output_tok_s']:9.0f} tok/s  TPOT p50 {summary['tpot_p50_ms']:6.2f} "
                  f"ms  TTFT p50 {summary['ttft_p50_ms']:7.1f} ms  mode {engine.ctl.mode}  "
                  f"split {engine.ctl.rebalancer.current}", flush=True)
    finally:
        engine.close()
    return out


def _serve_fresh(label: str, args: list[str]) -> dict:
    """serve_config in a process of its own: engines built one after another in one process got slower
    (the fifth, adaptive, decoded ~0.8 ms a step slower than the first, pd, at split none on 2x H200)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "config.json"
        proc = subprocess.run([sys.executable, __file__, "--one-config", label, "--config-out", str(out)] + args)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{label}: the child process failed (exit {proc.returncode})")
        return {float(k): v for k, v in json.loads(out.read_text()).items()}


def part2(results: dict, device: str, rates: list[float], split_step: int, pairs: int, child_args: list[str],
          warm_args: list[str] | None, save) -> None:
    """Each configuration in a fresh process (model, workload and rates travel in `child_args`): pd and
    adaptive first, side by side, then the static splits, then (pairs > 1) adaptive and pd again in the
    reverse order, so neither is always the later one."""
    from real.engine import hardware_of

    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    splits = hardware_of(dev, 2, split_step).allowed_splits()
    order = ["pd", "adaptive"] + [f"pipeline@{s[0]}" for s in splits] + ["adaptive", "pd"] * (pairs - 1)
    if warm_args is not None:  # a fresh node's first process JIT-compiles kernels into on-disk caches while it
        _serve_fresh("adaptive", warm_args)  # serves (pd served first ran 3-5x slower TTFT on 2x H200): not timed
    runs: dict[str, list[dict]] = {}
    for label in order:
        runs.setdefault(label, []).append(_serve_fresh(label, child_args))
        results["serving_partial"] = {k: [{str(r): x for r, x in v.items()} for v in xs] for k, xs in runs.items()}
        save()  # a time limit that cuts the last configurations keeps the ones served
    del results["serving_partial"]
    tok_s = {label: {r: float(np.mean([x[r]["output_tok_s"] for x in xs])) for r in rates} for label, xs in runs.items()}
    for label, xs in runs.items():
        for r in rates:
            for j, x in enumerate(xs):
                results.setdefault("serving", {})[f"{label}/x{r:g}" + (f"#{j + 1}" if len(xs) > 1 else "")] = x[r]
    best_static = {r: max(v[r] for k, v in tok_s.items() if k != "adaptive") for r in rates}
    results["serving_order"] = order
    results["serving_tok_s"] = {k: {str(r): x for r, x in v.items()} for k, v in tok_s.items()}
    results["adaptive_over_best_static"] = {f"x{r:g}": tok_s["adaptive"][r] / best_static[r] for r in rates}
    results["adaptive_over_pd"] = {f"x{r:g}": tok_s["adaptive"][r] / tok_s["pd"][r] for r in rates}
    if pairs > 1:  # each pair alone: how far one adaptive/pd ratio moves from run to run
        results["adaptive_over_pd_by_pair"] = [
            {f"x{r:g}": runs["adaptive"][j][r]["output_tok_s"] / runs["pd"][j][r]["output_tok_s"] for r in rates}
            for j in range(pairs)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--trace", default=None)
    ap.add_argument("--split-step", type=int, default=16, help="part 1: splits in steps of this many SMs")
    ap.add_argument("--serving-split-step", type=int, default=32,
                    help="part 2: static pipelines at, and adaptive choosing among, splits in steps of this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["steps", "serving"])
    ap.add_argument("--requests", type=int, default=None, help="requests per serving run (default 300 on GPU)")
    ap.add_argument("--rates", nargs="+", type=float, default=None, help="rate scales of the serving runs")
    ap.add_argument("--pairs", type=int, default=1,
                    help="part 2: serve pd and adaptive this many times each (fresh processes, order alternated)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one-config", default=None, help=argparse.SUPPRESS)  # a child of part 2
    ap.add_argument("--config-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from real.engine import resolve_device

    device = resolve_device(args.device)
    gpu = device == "cuda"
    model = "qwen3-0.6b" if gpu else "tiny"
    n = args.requests or (300 if gpu else 8)
    rates = args.rates or ([8.0, 32.0, 1000.0] if gpu else [1.0])
    split_step = args.serving_split_step if gpu else 8
    if args.one_config:
        import json

        out = serve_config(args.one_config, device, model, args.trace, n, rates, split_step)
        Path(args.config_out).write_text(json.dumps({str(r): v for r, v in out.items()}))
        return 0
    results = dict(gpu=torch.cuda.get_device_name(0) if gpu else "cpu", date=date.today().isoformat(),
                   command="python bench/pipeline_bench.py " + " ".join(sys.argv[1:]))
    out = results_path(args.out, "pipeline", results["gpu"])
    if "steps" not in args.skip and gpu:  # green contexts and graphs need a GPU
        part1(results, ["qwen3-0.6b", "qwen3-8b"], args.split_step)
    if "serving" not in args.skip:
        child = ["--device", device, "--requests", str(n), "--rates", *map(str, rates),
                 "--serving-split-step", str(args.serving_split_step)] + (["--trace", args.trace] if args.trace else [])
        warm = ["--device", device, "--requests", "40", "--rates", "8", "--serving-split-step",
                str(args.serving_split_step)] + (["--trace", args.trace] if args.trace else []) if gpu else None
        part2(results, device, rates, split_step, args.pairs, child, warm,
              lambda: write_results(out, results, default=str))
    write_results(out, results, default=str)
    print(f"captured fraction {results.get('overlap_ceiling_captured_fraction')}, adaptive/best static "
          f"{results.get('adaptive_over_best_static')}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
