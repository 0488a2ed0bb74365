"""Two-GPU prefill/decode split on the real engine (issue 4): link, KV transfer, overlap, single vs dp vs pd.

Run on a 2-GPU node, everything in one call:
    python bench/pd_bench.py --trace <Azure conv CSV carried along> --out bench/results/pd_<gpu>.json
Smoke test on CPU (tiny model, small loads): python bench/pd_bench.py --device cpu

Reports nvlink_copy_gbps (a plain GPU0->GPU1 copy), kv_transfer_gbps (the engine's block copy of one long
request), prefill_decode_overlap_fraction (share of GPU1 decode time during which GPU0 was busy, from
steps.csv rows of the pd runs), and per workload and policy: throughput, TTFT/TPOT p50/p99 and SLO
attainment at each rate; goodput = the highest tested rate with >= 90% attainment; goodput_pd_over_dp.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis import Slo, summarize  # noqa: E402
from analysis.metrics import interval_union_s, request_latencies  # noqa: E402
from traces.schema import REQUESTS, STEPS  # noqa: E402


def plain_copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    b = torch.empty_like(a, device="cuda:1")
    b.copy_(a)
    torch.cuda.synchronize("cuda:0"), torch.cuda.synchronize("cuda:1")
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize("cuda:0"), torch.cuda.synchronize("cuda:1")
    return 5 * a.numel() / (time.perf_counter() - t0) / 1e9


def transport_gbps(engine, tokens: int = 8192) -> float:
    """One long request's KV (all layers, K and V) through the engine's transport."""
    from policies.request import Request

    bs = engine.runners["gpu0"].block_size
    r = Request(10**9, 0.0, tokens, 1)
    r.blocks = list(range(tokens // bs))
    r.dst_blocks = list(range(tokens // bs + 1))
    best = 0.0
    for _ in range(4):
        t0 = time.perf_counter()
        engine.transport.start(r)
        while not engine.transport.poll():
            pass
        best = max(best, len(r.blocks) * engine.transport.block_bytes / (time.perf_counter() - t0) / 1e9)
    return best


def overlap_fraction(steps: pd.DataFrame) -> float:
    """Share of GPU1 decode busy time during which GPU0 was busy too."""
    g0 = steps[steps.device == "gpu0"]
    g1 = steps[(steps.device == "gpu1") & steps.stage.isin(["decode", "attn"])]
    if g1.empty or g0.empty:
        return 0.0
    both = 0.0
    s0, e0 = g0.t_start_s.to_numpy(), g0.t_end_s.to_numpy()
    for a, b in zip(g1.t_start_s.to_numpy(), g1.t_end_s.to_numpy()):
        lo, hi = np.maximum(s0, a), np.minimum(e0, b)
        m = hi > lo
        both += interval_union_s(lo[m], hi[m]) if m.any() else 0.0
    return both / interval_union_s(g1.t_start_s.to_numpy(), g1.t_end_s.to_numpy())


def ttft_with_and_without_transfer(engine, workload, rate: float, slo: Slo, repeats: int = 3) -> dict:
    """pd, same prompts and arrivals, 16 output tokens each, `repeats` interleaved triples (one pair's p50
    ratio swung from 0.94 to 1.17 between two calls on the same node):
    - "with": every request's KV crosses the link through the engine's transport while GPU0 prefills the next;
    - "without": the same run with transport mode "none" (no byte moves; same scheduling and GPU1 decode load),
      so with/without is the cost of the copy itself, the issue's goal;
    - "prefill_only": one output token, the request ends at GPU0 (no transfer and no decode on GPU1): with/
      prefill_only adds what GPU1's decode beside the prefill costs TTFT (host threads, the GIL).
    TTFT p50/mean of the pooled requests per variant, their ratios, and each triple's p50 ratios."""
    from dataclasses import replace

    from real.transfer import BlockCopyTransport

    real_transport = engine.transport
    no_copy = BlockCopyTransport(real_transport.src, real_transport.dst, mode="none")
    variants = (("without", 16, no_copy), ("with", 16, real_transport), ("prefill_only", 1, real_transport))
    out, pooled, pairs = {}, {v[0]: [] for v in variants}, []
    offset = 0
    try:
        for _ in range(repeats):
            p50 = {}
            for label, tokens, transport in variants:
                engine.transport = transport
                w = replace(workload, requests=[replace(r, output_tokens=tokens) for r in workload.requests])
                summary, steps, reqs = serve(engine, w, rate, slo, seed=0, offset=offset)
                offset += 10**6
                pooled[label] += request_latencies(reqs).ttft_s.dropna().tolist()
                p50[label] = summary["ttft_p50_ms"]
                out.setdefault(f"{label}_transfers", 0)
                out[f"{label}_transfers"] += int((steps.stage == "transfer").sum())
            pairs.append(dict(with_over_without=p50["with"] / p50["without"],
                              with_over_prefill_only=p50["with"] / p50["prefill_only"]))
    finally:
        engine.transport = real_transport
    for label, ttfts in pooled.items():
        out[label] = dict(ttft_p50_ms=float(np.median(ttfts)) * 1e3, ttft_mean_ms=float(np.mean(ttfts)) * 1e3,
                          ttft_p99_ms=float(np.percentile(ttfts, 99)) * 1e3, requests=len(ttfts))
    for base in ("without", "prefill_only"):
        for stat in ("p50", "mean"):
            out[f"ttft_{stat}_ratio" + ("" if base == "without" else "_over_prefill_only")] = \
                out["with"][f"ttft_{stat}_ms"] / out[base][f"ttft_{stat}_ms"]
    out["triple_p50_ratios"] = pairs
    print(f"TTFT with / without KV copy (same decode load; {repeats} interleaved runs each, pooled): "
          f"p50 {out['ttft_p50_ratio']:.3f}, mean {out['ttft_mean_ratio']:.3f}; per run "
          + ", ".join(f"{x['with_over_without']:.3f}" for x in pairs), flush=True)
    print(f"TTFT with transfer+decode / prefill only: p50 {out['ttft_p50_ratio_over_prefill_only']:.3f}, mean "
          f"{out['ttft_mean_ratio_over_prefill_only']:.3f} ({out['with_transfers']} transfers logged with, "
          f"{out['without_transfers']} without-copy, {out['prefill_only_transfers']} prefill-only)", flush=True)
    return out


def serve(engine, workload, rate: float, slo: Slo, seed: int, offset: int) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Serve the workload at `rate` on the engine: (summary, steps, requests) of this run alone."""
    from real.engine import SamplingParams, synthetic_prompt
    from traces.workload import scale_rate

    w = scale_rate(workload, rate)
    vocab = engine.model_cfg.vocab_size
    pending = [(s.arrival_s, offset + s.request_id, synthetic_prompt(s.request_id, s.prompt_tokens, vocab, seed),
                SamplingParams(temperature=0.0, max_tokens=s.output_tokens, ignore_eos=True)) for s in w.requests]
    first_req, first_step = len(engine.ctl.requests), len(engine.steps)
    engine.reset_clock()
    engine.run_until_done(pending)
    reqs = pd.DataFrame([r.as_row() for r in engine.ctl.requests[first_req:]], columns=REQUESTS.names)
    steps = pd.DataFrame(engine.steps[first_step:], columns=STEPS.names)
    return summarize(reqs, slo, steps=steps), steps, reqs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--model", default=None, help="default qwen3-0.6b on GPU, tiny on CPU")
    ap.add_argument("--trace", default=None, help="Azure conv CSV (else an Azure-like synthetic workload)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--rates", nargs="+", type=float, default=None, help="rate scales to serve at")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=20.0, help="a tight TPOT SLO (issue 4)")
    ap.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="EngineConfig.prefill_graphs for every policy")
    ap.add_argument("--policies", nargs="+", default=["single", "dp", "pd"], choices=["single", "dp", "pd"])
    ap.add_argument("--kv-transport", default="auto", choices=["auto", "pull", "copy", "push"],
                    help="EngineConfig.kv_transport of the pd engine")
    ap.add_argument("--ttft-pairs", type=int, default=3, help="interleaved with/without-transfer TTFT runs")
    ap.add_argument("--transfer-only", action="store_true",
                    help="pd only: the KV transfer bandwidth and the TTFT A/B, no serving sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.transfer_only:
        args.policies = ["pd"]
    from real.config import EngineConfig
    from real.engine import LLMEngine, resolve_device
    from traces.workload import make_workload, synthetic_workload

    device = resolve_device(args.device)
    gpu = device == "cuda"
    model = args.model or ("qwen3-0.6b" if gpu else "tiny")
    n = args.requests or (300 if gpu else 12)
    rates = args.rates or ([4.0, 8.0, 16.0, 32.0] if gpu else [1.0])
    workloads = {
        "azure_conv": make_workload(args.trace or "synthetic", num_requests=n, seed=0),
        "prefill_heavy": synthetic_workload(n, rate_rps=2.0, seed=1, prompt_stats=dict(mean=3000, p50=2600, max=7000),
                                            output_stats=dict(mean=48, p50=40, max=128)),
    }
    rates_of = {"azure_conv": rates, "prefill_heavy": rates[1:] or rates}
    if not gpu:  # the tiny model's context is 4096 tokens
        from traces.workload import apply_max_context

        workloads = {k: apply_max_context(w, 4000, "clip") for k, w in workloads.items()}
    slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    results = dict(gpu=torch.cuda.get_device_name(0) if gpu else "cpu", date=date.today().isoformat(),
                   command="python bench/pd_bench.py " + " ".join(sys.argv[1:]), model=model, requests=n,
                   rates=rates, slo=dict(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms), runs={})
    if gpu:
        results["nvlink_copy_gbps"] = plain_copy_gbps()
        print(f"plain GPU0->GPU1 copy: {results['nvlink_copy_gbps']:.0f} GB/s", flush=True)
    overlaps, goodput = [], {}
    out = results_path(args.out, "pd", results["gpu"])
    results["prefill_graphs"] = args.prefill_graphs
    for policy in args.policies:
        engine = LLMEngine(EngineConfig(model=model, device=device, seed=0, prefill_graphs=args.prefill_graphs,
                                        kv_transport=args.kv_transport), policy,
                           log=lambda *_: None)
        offset = 0
        if policy == "pd":
            if gpu:
                results["kv_transport_mode"] = engine.transport.mode
                results["kv_transfer_gbps"] = transport_gbps(engine)
                print(f"engine KV transfer (8192-token request, {engine.transport.mode} mode): "
                      f"{results['kv_transfer_gbps']:.0f} GB/s", flush=True)
            results["ttft_transfer"] = ttft_with_and_without_transfer(engine, workloads["azure_conv"], rates[0], slo,
                                                                      args.ttft_pairs)
            offset = 100 * 10**6
            write_results(out, results)
        if args.transfer_only:
            engine.close()
            return 0
        for name, w in workloads.items():
            for rate in rates_of[name]:
                summary, steps, _ = serve(engine, w, rate, slo, seed=0, offset=offset)
                offset += 10**6
                if policy == "pd":
                    overlaps.append(overlap_fraction(steps))
                key = f"{name}/{policy}/x{rate:g}"
                results["runs"][key] = {k: summary.get(k) for k in (
                    "finished", "throughput_rps", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                    "tpot_p99_ms", "slo_attainment", "gpu0_busy_pct", "gpu1_busy_pct", "transfer_gb")}
                r = results["runs"][key]
                print(f"{key:28s} {r['output_tok_s']:9.0f} tok/s  TTFT p99 {r['ttft_p99_ms']:8.1f} ms  "
                      f"TPOT p99 {r['tpot_p99_ms']:6.2f} ms  attainment {r['slo_attainment']:.2f}", flush=True)
                if r["slo_attainment"] >= 0.9:
                    goodput[(name, policy)] = max(goodput.get((name, policy), 0.0), rate * w.rate_rps)
                write_results(out, results)  # partial results survive a time-out
        engine.close()
        del engine
        gc.collect()
    results["prefill_decode_overlap_fraction"] = float(np.mean(overlaps)) if overlaps else 0.0
    results["goodput_rps"] = {f"{k[0]}/{k[1]}": v for k, v in goodput.items()}
    results["goodput_pd_over_dp"] = {name: (goodput.get((name, "pd"), 0.0) / goodput[(name, "dp")]
                                            if goodput.get((name, "dp")) else None) for name in workloads}
    write_results(out, results)
    print(f"overlap {results['prefill_decode_overlap_fraction']:.2f}; goodput pd/dp {results['goodput_pd_over_dp']}; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
