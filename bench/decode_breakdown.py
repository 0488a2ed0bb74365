"""Where a decode step's GPU time goes (issue 3: what limits the roofline fraction), on this GPU.

    python bench/decode_breakdown.py --out bench/results/decode_breakdown_<gpu>.json

For each (model, batch, context) case: the engine's decode CUDA graph is replayed under torch.profiler and
its kernels summed by kind (GEMMs, paged attention, its split reduce, KV store, the elementwise fusions:
hand-written Triton or torch.compile'd, by --fused-kernels; other), against the replay's own time: the
difference is the GPU idling between kernels. Also the lm_head and the sampler after the graph (temperature
0.6: the old five-pass torch Gumbel sampler against the fused Triton kernel), each timed alone with CUDA
events. Then eager prefill steps with the elementwise ops unfused against fused (Fused.eager_min_tokens).
"""
from __future__ import annotations

import argparse
import gc
import re
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402
from engine_single import _per_call  # noqa: E402  (the same warm-up and CUDA-event timing)
from real.config import FUSED_KERNELS as FUSED_KERNEL_CHOICES  # noqa: E402

import torch  # noqa: E402

KINDS = (("attention", r"_paged_decode"), ("attn_reduce", r"_split_reduce"), ("store_kv", r"_store_kv"),
         ("gemm", r"gemm|gemv|sm90|sm80|cutlass|nvjet|cublas|splitK"), ("fused_elementwise", r"^triton_|^_fused_"),
         ("other", r"."))


def kind_of(name: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, name))


def kernel_table(fn, reps: int = 5) -> tuple[dict, int]:
    """Kernel time per kind per call of fn (seconds), and kernels per call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kind, count = defaultdict(float), 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per_kind[kind_of(ev.name)] += ev.device_time / 1e6 / reps
            count += 1
    return dict(per_kind), count // reps


def case(model: str, batch: int, context: int, fused_kernels: str = "triton") -> dict:
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model_config import ModelConfig
    from real.runner import ModelRunner
    from real.testing import fake_decode_batch

    spec = model_spec(model)
    cfg = EngineConfig(model=model, max_num_seqs=batch, max_model_len=context + 64,
                       num_kv_blocks=batch * (context // 16 + 2) + 8, max_num_batched_tokens=4096,
                       fused_kernels=fused_kernels)
    runner = ModelRunner(cfg, ModelConfig.from_spec(spec), torch.device("cuda:0"), None)
    b = fake_decode_batch(runner, batch, context)
    runner.run(b, {})  # stage the inputs
    graph = runner.graphs.graphs[runner.graphs.bucket(batch)]
    replay = _per_call(graph.replay, 20, events=True)
    kinds, kernels = kernel_table(graph.replay)
    source = "graph"
    if not kernels:  # this profiler sees no kernels inside graph replays: the eager forward's (unfused elementwise)
        s = runner.graphs.static
        kinds, kernels = kernel_table(lambda: runner.model(s["input_ids"][:batch], s["positions"][:batch],
                                                           runner.graphs._meta_rows(0, batch)))
        source = "eager"
    hidden = runner.graphs.static["hidden"][:batch]
    lm_head = _per_call(lambda: runner.model.compute_logits(hidden), 20, events=True)
    logits = runner.model.compute_logits(hidden)
    temps = [0.6] * batch
    sampler = {}
    for kind in ("torch", "triton"):
        runner.sampler.kind = kind
        sampler[kind] = _per_call(lambda: runner.sampler(logits, temps), 20, events=True)
    out = dict(model=model, batch=batch, context=context, replay_s=replay, kernels_from=source, kernels_per_step=kernels,
               kernel_s=kinds, idle_s=replay - sum(kinds.values()), lm_head_s=lm_head, sampler_s=sampler)
    print(f"{model} b{batch} ctx{context}: graph {replay * 1e3:.3f} ms, {kernels} kernels ({source}); "
          + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
          + f"; idle {out['idle_s'] * 1e3:.3f} ms | lm_head {lm_head * 1e3:.3f} ms, sampler torch "
          f"{sampler['torch'] * 1e3:.3f} / triton {sampler['triton'] * 1e3:.3f} ms", flush=True)
    runner.close()
    del runner, graph, hidden, logits
    gc.collect()
    torch.cuda.empty_cache()
    return out


def prefill_compiled_ab(model: str, shapes=((1, 1024), (4, 1024), (16, 1024), (8, 2048)),
                        fused_kernels: str = "triton") -> list[dict]:
    """Eager prefill steps with the elementwise ops unfused vs fused (Fused.eager_min_tokens; "compiled" is
    the fused row, by `fused_kernels`), wall time to the GPU's end, median of 5, the two alternating."""
    import statistics
    import time

    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model import Fused
    from real.model_config import ModelConfig
    from real.profile import prefill_batch
    from real.runner import ModelRunner

    cfg = EngineConfig(model=model, max_num_seqs=16, max_model_len=4096, num_kv_blocks=1200,
                       max_num_batched_tokens=16384, fused_kernels=fused_kernels)
    runner = ModelRunner(cfg, ModelConfig.from_spec(model_spec(model)), torch.device("cuda:0"), None)
    saved, rows = Fused.eager_min_tokens, []
    try:
        for n, length in shapes:
            batch = prefill_batch(runner, [length] * n)
            times = {"unfused": [], "compiled": []}
            for rep in range(6):
                for label, threshold in (("unfused", 10 ** 9), ("compiled", 1)):
                    Fused.eager_min_tokens = threshold
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    runner.run(batch, {})
                    torch.cuda.synchronize()
                    if rep:  # the first is a warm-up
                        times[label].append(time.perf_counter() - t0)
            row = dict(model=model, seqs=n, tokens=n * length, **{k: statistics.median(v) for k, v in times.items()})
            rows.append(row)
            print(f"prefill {model} {n} x {length}: unfused {row['unfused'] * 1e3:.1f} ms, compiled "
                  f"{row['compiled'] * 1e3:.1f} ms", flush=True)
    finally:
        Fused.eager_min_tokens = saved
        runner.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", nargs="+", default=["qwen3-8b:1:1024", "qwen3-8b:64:1024", "qwen3-8b:256:1024",
                                                   "qwen3-0.6b:256:1024", "qwen3-0.6b:32:1536"],
                    metavar="MODEL:BATCH:CONTEXT")
    ap.add_argument("--fused-kernels", default="triton", choices=FUSED_KERNEL_CHOICES,
                    help="the elementwise fusions measured: hand-written Triton kernels or torch.compile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    out = results_path(args.out, "decode_breakdown", gpu)
    results = dict(gpu=gpu, date=date.today().isoformat(), torch=torch.__version__,
                   command="python bench/decode_breakdown.py " + " ".join(sys.argv[1:]),
                   fused_kernels=args.fused_kernels, cases=[])
    for c in args.cases:
        model, batch, context = c.split(":")
        results["cases"].append(case(model, int(batch), int(context), args.fused_kernels))
        write_results(out, results)
    results["prefill_compiled_ab"] = prefill_compiled_ab("qwen3-0.6b", fused_kernels=args.fused_kernels)
    write_results(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
