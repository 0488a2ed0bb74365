"""Where does a step of the engine go? The nano-vllm workload under cProfile, plus step-time statistics.

    python bench/profile_engine.py [--seqs 256] [--mixed-budget 2048] [--no-profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--mixed-budget", type=int, default=2048)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    from real import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(args.seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024))
              for _ in range(args.seqs)]
    llm = LLM(args.model, seed=0, policy_overrides={"scheduler": {"mixed_token_budget": args.mixed_budget}})
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    torch.cuda.synchronize()
    prof = None if args.no_profile else cProfile.Profile()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    outs = llm.generate(prompts, params)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    tokens = sum(len(o["token_ids"]) for o in outs)
    print(f"{args.model} mixed budget {args.mixed_budget}: {tokens} tokens in {wall:.2f} s = {tokens / wall:,.0f} tok/s"
          f"{' (under cProfile)' if prof else ''}")
    steps = llm.engine.steps[1:]
    dur = np.array([s[1] - s[0] for s in steps])
    stage = np.array([s[3] for s in steps])
    size = np.array([s[4] for s in steps])
    for name in ("decode", "mixed", "prefill"):
        m = stage == name
        if m.any():
            print(f"  {name:8s} {m.sum():5d} steps, mean {dur[m].mean() * 1e3:7.2f} ms, total {dur[m].sum():6.2f} s")
    for lo, hi in ((1, 32), (33, 96), (97, 160), (161, 256)):
        m = (stage == "decode") & (size >= lo) & (size <= hi)
        if m.any():
            print(f"  decode batch {lo:3d}-{hi:3d}: {m.sum():5d} steps, mean {dur[m].mean() * 1e3:6.2f} ms")
    gaps = np.array([b[0] - a[1] for a, b in zip(steps, steps[1:])])
    print(f"  host time between steps: mean {gaps.mean() * 1e3:.3f} ms, total {gaps.sum():.2f} s")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
