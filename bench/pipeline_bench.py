"""GPU1 attention/FFN pipeline on the real engine (issue 5): step times per split, the overlap ceiling,
and adaptive vs every static configuration.

Run on a 2-GPU node (part 1 uses GPU 0 only) in one call:
    python bench/pipeline_bench.py --trace <Azure conv CSV carried along> --out bench/results/pipeline_<gpu>.json
Smoke test on CPU (tiny model, partitions are no-ops): python bench/pipeline_bench.py --device cpu

Part 1, per model shape and decode batch (1024-token contexts): the sequential step (all SMs, CUDA graph),
the pipelined step (2 micro-batches) at each split, and the per-layer ceiling: attention of one micro-batch
on partition A concurrently with the FFN of another on partition B, against both run one after the other on
the whole GPU (the facts-file method). captured = (seq/pipeline - 1) / (seq_layer/pair_layer - 1).
Part 2: Azure-like load at three rates, pd and pipeline at each split vs adaptive (output tok/s).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.pd_bench import serve  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def layer_ceiling(runner, batch, split, reps: int) -> tuple[float, float]:
    """(sequential layer s, concurrent pair layer s) for one layer, micro-batches of batch/2."""
    from real.context import AttnMetadata

    layer, dev = runner.model.layers[0], runner.device
    half = batch.decode[: max(1, len(batch.decode) // 2)]
    ids, pos, slots, lens, table = runner.prepare_decode(half)
    meta = AttnMetadata(is_prefill=False, slot_mapping=runner._tensor(slots, torch.int64),
                        block_tables=runner._tensor(table, torch.int32), context_lens=runner._tensor(lens, torch.int32))
    pos_t = runner._tensor(pos, torch.int64)
    h = runner.model.embed_tokens(runner._tensor(ids, torch.int64))
    res = torch.zeros_like(h)

    def seq():
        a, r = layer.attention_half(pos_t, h, res, meta)
        layer.ffn_half(a, r)

    attn_stream, ffn_stream = runner.partitions.get(split) if runner.partitions else (None, None)

    def pair():
        if attn_stream is None:
            return seq()
        start = torch.cuda.Event()
        start.record()
        attn_stream.wait_event(start)
        ffn_stream.wait_event(start)
        with torch.cuda.stream(attn_stream):
            layer.attention_half(pos_t, h, res, meta)
        with torch.cuda.stream(ffn_stream):
            layer.ffn_half(h, res)
        torch.cuda.current_stream().wait_stream(attn_stream)
        torch.cuda.current_stream().wait_stream(ffn_stream)

    with torch.inference_mode():
        return timed(seq, dev, reps), timed(pair, dev, reps)


def part1(results: dict, device: str, models: list[str], batches: list[int], context: int, split_step: int) -> None:
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.engine import hardware_of
    from real.green import SmPartitions
    from real.model_config import ModelConfig
    from real.runner import ModelRunner
    from real.testing import fake_decode_batch

    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    reps = 10 if device == "cuda" else 2
    table, captured = [], []
    for name in models:
        per = context // 16 + 1
        cfg = EngineConfig(model=name, device=device, max_num_seqs=max(batches), max_model_len=context + 64,
                           num_kv_blocks=max(batches) * per + 8, max_num_batched_tokens=2048)
        runner = ModelRunner(cfg, ModelConfig.from_spec(model_spec(name)), dev, None)
        splits = [s for s in hardware_of(dev, 2).allowed_splits() if s[0] % split_step == 0] or \
            hardware_of(dev, 2).allowed_splits()
        runner.partitions = SmPartitions(dev, splits)
        for b in batches:
            batch = fake_decode_batch(runner, b, context)
            seq = timed(lambda: runner.run(batch, {}), dev, reps)
            row = dict(model=name, batch=b, seq_step_ms=seq * 1e3, pipeline_step_ms={}, layer_seq_ms=None,
                       layer_pair_ms={})
            best_pipe, best_ceiling = None, None
            for split in splits:
                pipe = timed(lambda: runner.run(batch, {}, split, 2), dev, reps)
                ls, lp = layer_ceiling(runner, batch, split, reps)
                row["pipeline_step_ms"][f"{split[0]}:{split[1]}"] = pipe * 1e3
                row["layer_seq_ms"] = ls * 1e3
                row["layer_pair_ms"][f"{split[0]}:{split[1]}"] = lp * 1e3
                best_pipe = pipe if best_pipe is None else min(best_pipe, pipe)
                best_ceiling = ls / lp if best_ceiling is None else max(best_ceiling, ls / lp)
            row["best_pipeline_speedup"] = seq / best_pipe
            row["ceiling_speedup"] = best_ceiling
            if best_ceiling > 1.01 and device == "cuda":  # on CPU there is no overlap to capture
                captured.append((seq / best_pipe - 1) / (best_ceiling - 1))
            table.append(row)
            print(f"{name:11s} batch {b:4d}: seq {seq * 1e3:7.2f} ms, best pipeline {best_pipe * 1e3:7.2f} ms "
                  f"(x{seq / best_pipe:.2f}), layer ceiling x{best_ceiling:.2f}", flush=True)
        runner.close()
    results["step_times"] = table
    results["overlap_ceiling_captured_fraction"] = min(captured) if captured else None


def part2(results: dict, device: str, model: str, trace: str | None, n: int, rates: list[float],
          split_step: int) -> None:
    from analysis import Slo
    from policies import load_policy_config
    from real.config import EngineConfig
    from real.engine import LLMEngine, hardware_of
    from traces.workload import make_workload

    w = make_workload(trace or "synthetic", num_requests=n, seed=0)
    slo = Slo(1.0, 0.05)
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    splits = [s for s in hardware_of(dev, 2).allowed_splits() if s[0] % split_step == 0] or [None]
    configs = [("pd", None)] + [("pipeline", s) for s in splits if s] + [("adaptive", None)]
    tok_s: dict[str, dict[float, float]] = {}
    for policy, split in configs:
        pcfg = load_policy_config(policy, overrides={"attn_sms": split[0]} if split else None)
        engine = LLMEngine(EngineConfig(model=model, device=device, seed=0), policy, pcfg, log=lambda *_: None)
        label = policy + (f"@{split[0]}" if split else "")
        tok_s[label] = {}
        for i, rate in enumerate(rates):
            summary, _ = serve(engine, w, rate, slo, seed=0, offset=i * 10**6)
            tok_s[label][rate] = summary["output_tok_s"]
            print(f"{label:14s} x{rate:<5g} {summary['output_tok_s']:9.0f} tok/s  mode {engine.ctl.mode}", flush=True)
        engine.close()
    best_static = {r: max(v[r] for k, v in tok_s.items() if k != "adaptive") for r in rates}
    results["serving_tok_s"] = {k: {str(r): x for r, x in v.items()} for k, v in tok_s.items()}
    results["adaptive_over_best_static"] = {f"x{r:g}": tok_s["adaptive"][r] / best_static[r] for r in rates}
    results["adaptive_over_pd"] = {f"x{r:g}": tok_s["adaptive"][r] / tok_s["pd"][r] for r in rates}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--trace", default=None)
    ap.add_argument("--split-step", type=int, default=16, help="measure splits whose attention SMs divide by this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["steps", "serving"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from real.engine import resolve_device

    device = resolve_device(args.device)
    gpu = device == "cuda"
    results = dict(gpu=torch.cuda.get_device_name(0) if gpu else "cpu", date=date.today().isoformat(),
                   command="python bench/pipeline_bench.py " + " ".join(sys.argv[1:]))
    if "steps" not in args.skip:
        part1(results, device, ["qwen3-0.6b", "qwen3-8b"] if gpu else ["tiny"],
              [8, 32, 128, 512] if gpu else [4, 8], 1024 if gpu else 128, args.split_step if gpu else 8)
    if "serving" not in args.skip:
        part2(results, device, "qwen3-0.6b" if gpu else "tiny", args.trace, 400 if gpu else 8,
              [2.0, 4.0, 8.0] if gpu else [1.0], args.split_step if gpu else 8)
    out = Path(args.out or ROOT / f"bench/results/pipeline_{results['gpu'].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"captured fraction {results.get('overlap_ceiling_captured_fraction')}, adaptive/best static "
          f"{results.get('adaptive_over_best_static')}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
