"""Single-GPU engine benchmark (issue 3): correctness vs HF, throughput vs HF, decode vs the HBM roofline.

Run on a GPU node, everything in one call (ratios are only meaningful side by side):
    python bench/engine_single.py --out bench/results/engine_single_<gpu>.json

1. correctness: qwen3-0.6b shape, random bf16 weights, 64 prompts: first 32 greedy tokens equal to HF
   transformers' generate on the same weights (>= 95% of prompts), and the relative error of the
   prefill logits.
2. the nano-vllm benchmark workload: 256 sequences, prompt and output lengths uniform in 100..1024,
   ignore EOS, temperature 0.6, qwen3-0.6b: output tok/s; and HF generate at batch 64 (256-token prompts,
   128 new tokens) on the same GPU. Goal >= 20,000 tok/s and >= 20x HF.
3. decode step time vs the HBM roofline, qwen3-8b shape, 1024-token contexts, batch 1/16/64/256:
   (weight bytes + KV bytes) / measured copy bandwidth over the measured step time. Goal >= 0.75 at >= 64.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402
from real.config import FUSED_KERNELS as FUSED_KERNEL_CHOICES  # noqa: E402

import torch  # noqa: E402


BLOCK_SIZE = 16  # KV cache block size of the engines measured (--block-size)
FUSED_KERNELS = "triton"  # how the engines measured fuse the elementwise ops (--fused-kernels)


def log(*a):
    print(*a, flush=True)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the achievable HBM roof)."""
    n = 2 * 1024**3
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * n * 10 / (start.elapsed_time(end) / 1e3)
    del a, b
    return bw


def correctness(results: dict) -> None:
    from real import LLM, SamplingParams
    from real.weights import export_hf_state_dict

    llm = LLM("qwen3-0.6b", seed=0, fused_kernels=FUSED_KERNELS)
    runner = llm.engine.runners["gpu0"]
    hf = _hf_bf16(runner.model_cfg.to_hf_config())
    hf.load_state_dict(export_hf_state_dict(runner.model), strict=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(16, 256))] for _ in range(64)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    equal, rel_errs = 0, []
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p], device="cuda")
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            equal += ref == o["token_ids"]
            ref_logits = hf(ids).logits[0, -1].float()
            ours = _prefill_logits(runner, p)
            rel_errs.append(((ours - ref_logits).norm() / ref_logits.norm()).item())
    results["correctness"] = dict(prompts=len(prompts), greedy_32_equal=equal, equal_fraction=equal / len(prompts),
                                  logits_rel_err_max=max(rel_errs), logits_rel_err_mean=sum(rel_errs) / len(rel_errs))
    log(f"correctness: {equal}/64 prompts with 32 identical greedy tokens; prefill logits rel err "
        f"mean {results['correctness']['logits_rel_err_mean']:.2e} max {max(rel_errs):.2e}")
    llm.close()
    del llm, hf, runner
    gc.collect()
    torch.cuda.empty_cache()


def _hf_bf16(cfg):
    """HF model built in bf16 on the GPU (casting after construction would round its RoPE table)."""
    import transformers

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return transformers.Qwen3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def _prefill_logits(runner, prompt: list[int]) -> torch.Tensor:
    from policies.request import Request
    from real.context import AttnMetadata

    blocks = list(range(-(-len(prompt) // runner.block_size)))
    r = Request(0, 0.0, len(prompt), 1)
    r.token_ids, r.blocks = prompt, blocks
    ids, pos, meta, rows = runner.prepare_prefill([(r, len(prompt))])
    assert isinstance(meta, AttnMetadata)
    hidden = runner.model(ids, pos, meta)
    return runner.model.compute_logits(hidden[-1:])[0].float()


def nanovllm_workload(results: dict, configs: list[tuple[int, int]]) -> None:
    """Each (mixed budget, decode steps) of `configs`: the `single` policy's default chunked-prefill budget
    is 2048 tokens per mixed step (protects TPOT), 16384 is prefill-first as nano-vllm schedules; decode
    steps > 1 run that many decode steps per schedule back to back on the GPU (EngineConfig.decode_steps)."""
    for budget, steps in configs:
        _nanovllm_workload(results, budget, steps)
    runs = {k: v for k, v in results.items() if k.startswith("nanovllm_workload_budget")}
    best = max(runs, key=lambda k: runs[k]["tok_s"])
    results["nanovllm_workload_tok_s"] = runs[best]["tok_s"]
    results["nanovllm_workload_best"] = best


def _nanovllm_workload(results: dict, budget: int, steps: int) -> None:
    from real import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024)) for _ in range(256)]
    llm = LLM("qwen3-0.6b", seed=0, block_size=BLOCK_SIZE, decode_steps=steps, fused_kernels=FUSED_KERNELS,
              policy_overrides={"scheduler": {"mixed_token_budget": budget}})
    try:
        # warm up on the same prompts: a fresh node JIT-compiles Triton kernel variants and the prefill fusions
        # for the shapes it meets first (it put 3.6 s of compiling into the first timed run on 1x H100)
        llm.generate(prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2)] * len(prompts))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    except Exception:
        llm.close()
        raise
    tokens = sum(len(o["token_ids"]) for o in outs)
    rows = llm.engine.steps[1:]
    decode_s = sum(s[1] - s[0] for s in rows if s[3] == "decode")
    decode_steps = sum(s[11] for s in rows if s[3] == "decode")
    sampler = llm.engine.runners["gpu0"].sampler.kind
    results[f"nanovllm_workload_budget{budget}_steps{steps}"] = dict(
        output_tokens=tokens, seconds=wall, tok_s=tokens / wall, schedules=len(rows), decode_steps=decode_steps,
        decode_only_s=decode_s, sampler=sampler)
    log(f"nano-vllm workload (mixed budget {budget}, decode steps {steps}, {sampler} sampler): {tokens} output "
        f"tokens in {wall:.2f} s = {tokens / wall:,.0f} tok/s ({len(rows)} schedules, {decode_steps} decode steps "
        f"taking {decode_s:.2f} s)")
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def hf_generate_b64(results: dict) -> None:
    from policies.specs import model_spec
    from real.model_config import ModelConfig

    cfg = ModelConfig.from_spec(model_spec("qwen3-0.6b")).to_hf_config()
    torch.manual_seed(0)
    hf = _hf_bf16(cfg)
    ids = torch.randint(0, 10000, (64, 256), device="cuda")
    with torch.inference_mode():
        hf.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=4, do_sample=False,
                    pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128, min_new_tokens=128,
                    do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    results["hf_generate_b64_tok_s"] = 64 * 128 / wall
    log(f"HF generate batch 64: {64 * 128 / wall:,.0f} tok/s")
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def _per_call(fn, n: int, events: bool = False) -> float:
    """Seconds per call of fn, after 3 warm-up calls: wall clock to the GPU's end (events: GPU time only)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if events:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def decode_roofline(results: dict, bw: float, batches=(1, 16, 64, 256), context=1024, steps: int = 8) -> None:
    """decode_roofline_fraction: the engine's decode at `steps` steps per schedule (EngineConfig.decode_steps),
    per step; also a step per schedule (host staging each step) and the forward's CUDA graph alone."""
    from real.config import EngineConfig
    from real.testing import fake_decode_batch
    from real.model_config import ModelConfig
    from real.runner import ModelRunner
    from policies.specs import model_spec

    spec = model_spec("qwen3-8b")
    mcfg = ModelConfig.from_spec(spec)
    blocks_per_seq = context // BLOCK_SIZE + 1
    cfg = EngineConfig(model="qwen3-8b", max_num_seqs=max(batches), max_model_len=4096, block_size=BLOCK_SIZE,
                       num_kv_blocks=max(batches) * (blocks_per_seq + 1) + 8, max_num_batched_tokens=4096,
                       fused_kernels=FUSED_KERNELS)
    runner = ModelRunner(cfg, mcfg, torch.device("cuda:0"), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    if not spec.tie_embeddings:  # the input embedding is a lookup of B rows, not a read of the table
        weight_bytes -= spec.vocab_size * spec.hidden_size * runner.dtype.itemsize
    lm_head_bytes = spec.vocab_size * spec.hidden_size * runner.dtype.itemsize
    out, single, graph_only = {}, {}, {}
    for b in batches:
        kv_bytes = b * (context + 1) * spec.kv_bytes_per_token
        roof = (weight_bytes + kv_bytes) / bw  # bw: HBM traffic (read + write) a large copy sustains
        batch = fake_decode_batch(runner, b, context)
        step = _per_call(lambda r=runner, bt=batch: r.run(bt, {}), 20)  # host staging + graph + sampling + token copy
        multi = fake_decode_batch(runner, b, context, steps=steps)
        multi_step = _per_call(lambda r=runner, bt=multi: r.run(bt, {}), 5) / steps  # steps decode steps per schedule
        multi_roof = sum(weight_bytes + b * (context + 1 + j) * spec.kv_bytes_per_token for j in range(steps)) / bw / steps
        runner.run(batch, {})  # stage the one-step inputs again
        graph = runner.graphs.graphs[runner.graphs.bucket(b)]
        replay = _per_call(graph.replay, 20, events=True)  # the forward's graph alone: no host, no lm_head, no sampling
        graph_roof = roof - lm_head_bytes / bw
        single[str(b)], out[str(b)], graph_only[str(b)] = roof / step, multi_roof / multi_step, graph_roof / replay
        log(f"decode qwen3-8b batch {b:4d} ctx {context}: roofline {roof * 1e3:7.3f} ms; step {step * 1e3:7.3f} ms "
            f"({roof / step:.2f}), {steps} steps per schedule {multi_step * 1e3:7.3f} ms/step ({multi_roof / multi_step:.2f}), "
            f"forward graph alone {replay * 1e3:7.3f} ms ({graph_roof / replay:.2f} of its roofline, without lm_head)")
    results["decode_roofline_fraction_single_step"] = single
    results["decode_roofline_fraction_graph_only"] = graph_only
    results["decode_roofline_steps_per_schedule"] = steps
    results["decode_roofline_fraction"] = out
    results["decode_weight_bytes"] = weight_bytes
    runner.close()
    del runner
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "nanovllm", "hf", "roofline"])
    ap.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens) of the engines measured")
    ap.add_argument("--workload", nargs="+", default=["16384:1", "16384:8"], metavar="BUDGET:STEPS",
                    help="nano-vllm workload runs: mixed-step token budget : decode steps per schedule")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per schedule in the roofline measurement")
    ap.add_argument("--fused-kernels", default="triton", choices=FUSED_KERNEL_CHOICES,
                    help="the engines' elementwise fusions: hand-written Triton kernels or torch.compile (an A/B)")
    args = ap.parse_args()
    try:
        configs = [tuple(int(x) for x in w.split(":")) for w in args.workload]
        assert all(len(c) == 2 and c[0] > 0 and c[1] > 0 for c in configs)
    except (ValueError, AssertionError):
        ap.error(f"--workload takes BUDGET:STEPS pairs of positive integers, got {args.workload}")
    global BLOCK_SIZE, FUSED_KERNELS
    BLOCK_SIZE, FUSED_KERNELS = args.block_size, args.fused_kernels
    from real.attention import decode_kernel_config

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    results = dict(gpu=gpu, date=date.today().isoformat(), command="python bench/engine_single.py " + " ".join(sys.argv[1:]),
                   torch=torch.__version__, block_size=BLOCK_SIZE, fused_kernels=FUSED_KERNELS,
                   decode_kernel=dict(zip(("block_n", "warps", "stages"), decode_kernel_config())))
    bw = copy_bandwidth()
    results["copy_bandwidth_bytes_per_s"] = bw
    log(f"{gpu}: device copy {bw / 1e12:.2f} TB/s (read + write)")
    steps = [("correctness", correctness), ("nanovllm", lambda r: nanovllm_workload(r, configs)),
             ("hf", hf_generate_b64), ("roofline", lambda r: decode_roofline(r, bw, steps=args.decode_steps))]
    out = results_path(args.out, "engine_single", gpu)
    for name, fn in steps:
        if name in args.skip:
            continue
        write_results(out, results)  # partial results survive a time-out
        try:
            fn(results)
        except Exception as e:  # keep the other measurements
            import traceback

            traceback.print_exc()
            results[f"{name}_error"] = f"{type(e).__name__}: {e}"
    if "nanovllm_workload_tok_s" in results and "hf_generate_b64_tok_s" in results:
        results["speedup_over_hf_b64"] = results["nanovllm_workload_tok_s"] / results["hf_generate_b64_tok_s"]
        log(f"speed-up over HF generate b64: {results['speedup_over_hf_b64']:.1f}x")
    write_results(out, results)
    log(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
