"""python -m real.run: serve a workload on the real engine and write the same run folder as sim.run.

    python -m real.run                                          # qwen3-0.6b, random weights, 100 synthetic requests
    python -m real.run --device cpu --model tiny --num-requests 8 --save-outputs --out /tmp/run
    python -m real.run --workload ../shared/traces/AzureLLMInferenceTrace_conv.csv --num-requests 500 --rate-scale 2
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from analysis.metrics import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS
from real.config import FUSED_KERNELS


def _fraction(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    from policies.specs import MODELS

    p = argparse.ArgumentParser(
        prog="python -m real.run",
        description="Serve a workload on the real engine (Qwen3 in PyTorch, paged KV cache, continuous batching "
                    "through the shared policies, CUDA graphs for decode) and write a run folder "
                    "(requests.csv, steps.csv, decisions.csv, run.json, summary.json[, outputs.jsonl]).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", default="single", choices=("single", "dp", "pd", "pipeline", "adaptive"),
                   help="single: one GPU; dp: two GPUs behind a least-loaded router; pd: GPU0 prefills, the KV "
                        "cache is copied to GPU1, which decodes; pipeline: pd + GPU1's SMs split between attention "
                        "and FFN (static); adaptive: pipeline with the rebalancer, back-pressure and fallback")
    p.add_argument("--attn-sms", type=int, default=0,
                   help="static attention SMs on GPU1 for --policy pipeline (the FFN gets the rest)")
    p.add_argument("--workload", default="synthetic", help="'synthetic' or a trace file (Azure, Mooncake, Vidur)")
    p.add_argument("--num-requests", type=int, default=100, help="requests to serve (a file: its first N)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate by this")
    p.add_argument("--closed-loop", action="store_true",
                   help="admit every request at once (max throughput) instead of at its scaled arrival time")
    p.add_argument("--model", default="qwen3-0.6b", help=f"random-weight preset ({', '.join(MODELS)})")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="local HF checkpoint (safetensors + config.json)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=0, help="0 = the model's (capped at 32768)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.90, metavar="F",
                   help="share of each GPU's memory the engine may fill, the KV cache taking what the weights and the "
                        "largest step leave (default 0.90)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--split-step", type=int, default=16,
                   help="GPU1 attention:FFN splits offered in steps of this many SMs (0 = the green-context "
                        "granularity, 8); each split costs one CUDA graph per batch bucket at start-up (~0.1 s each "
                        "on H200, from start-up times: 7 splits x 19 buckets at 16)")
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA graphs for prefills, per token bucket, on CUDA; chunks after a cached prefix too, through "
                        "a paged-prefill kernel (an eager prefill costs ~30-60 ms of host time: pd's TTFT p50 "
                        "70 -> 14 ms with them on 2x H200, Azure conv x8)")
    p.add_argument("--fused-kernels", default="triton", choices=FUSED_KERNELS,
                   help="how the elementwise ops (norms, q/k norm + RoPE, SiLU) are fused in CUDA graphs: "
                        "hand-written Triton kernels or torch.compile")
    p.add_argument("--kv-transport", default="auto", choices=["auto", "pull", "copy", "push"],
                   help="pd: how KV crosses to GPU1: a peer-access kernel on GPU1 (pull: 0.90 of a plain copy on "
                        "H200, TTFT unchanged), copy engines (copy: 0.75), the kernel on GPU0 (push: takes prefill's SMs); "
                        "auto (default) = pull where the GPUs have peer access, else copy. See real/transfer.py")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode steps per schedule, run back to back on the GPU (the host's per-step cost is paid "
                        "once; arrivals wait up to that many steps to be admitted)")
    p.add_argument("--pipeline-profiling", action="store_true",
                   help="run pipelined steps eagerly with per-stage timers (attn/ffn rows in steps.csv)")
    p.add_argument("--config", default=None, metavar="YAML", help="policy overrides, by section (as sim.run)")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<time>-real-<policy>/)")
    p.add_argument("--save-outputs", action="store_true", help="also write outputs.jsonl (request_id, token_ids)")
    p.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS)
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from policies import load_policy_config
    from traces.run_folder import default_run_dir, git_commit, versions, write_run
    from traces.workload import WorkloadError, make_workload

    from .stall_watch import StallWatch, freeze_startup_heap

    out = Path(args.out) if args.out else default_run_dir(f"real-{args.policy}")
    if out.exists() and not out.is_dir():
        print(f"error: --out {out}: exists and is not a folder", file=sys.stderr)
        return 2
    try:
        workload = make_workload(args.workload, num_requests=args.num_requests, rate_scale=args.rate_scale,
                                 seed=args.seed, skip_bad_rows=args.skip_bad_rows)
        from .config import EngineConfig
        from .engine import LLMEngine, SamplingParams, synthetic_prompt

        cfg = EngineConfig(model=args.checkpoint or args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                           max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                           gpu_memory_utilization=args.gpu_memory_utilization,
                           split_step_sms=args.split_step, pipeline_profiling=args.pipeline_profiling,
                           prefill_graphs=args.prefill_graphs, kv_transport=args.kv_transport,
                           decode_steps=args.decode_steps, fused_kernels=args.fused_kernels)
        overrides = {"attn_sms": args.attn_sms} if args.attn_sms else None
        pcfg = load_policy_config(args.policy, args.config, overrides)
        t_load = time.perf_counter()
        engine = LLMEngine(cfg, args.policy, pcfg, log=lambda msg: print(msg, file=sys.stderr))
    except (WorkloadError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t_load
    vocab = engine.model_cfg.vocab_size
    pending = [(0.0 if args.closed_loop else w.arrival_s, w.request_id,
                synthetic_prompt(w.request_id, w.prompt_tokens, vocab, args.seed),
                SamplingParams(temperature=args.temperature, max_tokens=w.output_tokens, ignore_eos=True))
               for w in workload.requests]
    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="req", desc=f"real {args.policy}")
    frozen = freeze_startup_heap()  # else a full collection walks the start-up heap mid-run (183-253 ms stalls)
    engine.reset_clock()  # after it: the collection's own time must not delay the first arrivals
    cuda = tuple(r.device for r in engine.runners.values() if r.device.type == "cuda")
    watch = StallWatch(clock=engine.clock, devices=cuda).start()  # host stalls, to match against slow steps
    t0 = time.perf_counter()
    try:
        engine.run_until_done(pending, on_done=(lambda done: bar.update(len(done))) if bar else None)
    finally:
        stalls = watch.stop()
        gc.unfreeze()  # hand an in-process caller (tests, notebooks) its heap back
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    import pandas as pd

    from analysis import Slo, format_summary, summarize
    from traces.schema import DECISIONS, REQUESTS, STEPS

    ctl = engine.ctl
    requests = [r.as_row() for r in ctl.requests]
    decisions = [d.as_row() for d in ctl.decisions]
    summary = summarize(pd.DataFrame(requests, columns=REQUESTS.names), Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3),
                        steps=pd.DataFrame(engine.steps, columns=STEPS.names),
                        decisions=pd.DataFrame(decisions, columns=DECISIONS.names))
    runner = engine.runners["gpu0"]
    summary.update(policy=args.policy, final_mode=ctl.mode, serve_wall_s=round(wall, 3), load_s=round(load_s, 2))
    device = str(runner.device) if runner.device.type == "cpu" else __import__("torch").cuda.get_device_name(runner.device)
    print(format_summary(summary, f"real: {args.policy} on {device} ({runner.dtype}, {runner.backend} attention), "
                                  f"{engine.model_cfg.name}, {len(pending)} requests"
                                  + (" closed loop" if args.closed_loop else f", rate x{args.rate_scale:g}")))
    import torch

    info = dict(backend="real", policy=args.policy, policy_config=engine.policy_config.to_dict(),
                engine_config={k: getattr(cfg, k) for k in cfg.__slots__}, model=engine.model_spec.to_dict(),
                hardware=dict(device=device, count=len(engine.devices)), attention_backend=runner.backend,
                dtype=str(runner.dtype), cuda_graphs=runner.graphs is not None, kv_blocks_per_gpu=runner.num_blocks,
                workload=dict(source=workload.source, format=workload.format, requests=len(workload.requests),
                              notes=workload.notes, closed_loop=args.closed_loop),
                slo=dict(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms), seed=args.seed,
                command=" ".join(["python -m real.run"] + (argv if argv is not None else sys.argv[1:])),
                git_commit=git_commit(), versions=dict(versions("numpy", "pandas"), torch=torch.__version__),
                host_stalls=dict(stalls, frozen_startup_objects=frozen))
    try:
        write_run(out, requests=requests, steps=engine.steps, decisions=decisions, run_info=info, summary=summary)
        if args.save_outputs:
            with (out / "outputs.jsonl").open("w") as f:
                for r in ctl.requests:
                    gen = r.token_ids[r.prompt_tokens:] if r.token_ids else []
                    f.write(json.dumps({"request_id": r.request_id, "token_ids": gen}) + "\n")
    except OSError as e:
        print(f"error: cannot write the run folder {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/" + (" (with outputs.jsonl)" if args.save_outputs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
