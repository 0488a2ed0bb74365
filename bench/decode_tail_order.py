"""Does a long sequence's place in a big decode batch set its tail? (issue 6: single's GPU0 steps of 129-256
sequences ran 16-29% over the sim's cost in session 15's first two rounds, where smaller batches were within 7%).

    python bench/decode_tail_order.py --out bench/results/decode_tail_order_<gpu>.json   # one GPU, ~1 min

The sim charges a batch of mixed contexts a decode tail: the longest sequence's programs stream its excess over
the mean context alone, at one program's rate (sim/calibrated.py decode_tail_s). In session 15's single runs that
held up to 128 sequences (real minus the modelled step -0.5..+0.1 ms, whatever the excess) and not beyond: at
129-256 sequences with a sequence 2-4k tokens over the mean the steps took 0.4-5.2 ms more than modelled
(bench/fidelity_diagnose.py colocated_beyond_model, bench/results/fidelity_diagnosis_NVIDIA_H200_session15{,_r2,_r3}.*). A hypothesis: past ~1,000 programs (batch x kv
heads x splits) the grid runs in more than one wave, and a long sequence whose programs sit late in the grid
starts only when the first wave drains, so its tail adds a start delay the model lacks.

Measured (1x H200, session 16; bench/results/decode_tail_order_NVIDIA_H200{,_8k}.json): no start delay. With one
4,096- (8,192-) token sequence among 1,024-token ones, last - first was -0.005..+0.009 ms a layer at every batch,
and the tail (first - uniform) 0.048-0.097 (0.119-0.231) ms a layer against the model's 0.049-0.101 (0.114-0.235):
the model reads 4% under at batch 32 and 11-16% over from 128 up. The served steps themselves, replayed alone
(bench/decode_mix_replay.py), ran at or under the model: the hypothesis is refuted.

For each batch (graph buckets), one layer's paged-decode kernel as the engine runs it (its tile, context splits
by decode_context_splits of the batch), timed in CUDA graphs: all sequences at --context tokens (uniform), and
one of them at --long tokens placed first in the grid, in the middle, or last. `first - uniform` is the tail
with no start delay, `last - first` the delay. The model's tail (one program's rate from decode_program rows
timed in the same call x excess / splits) is printed beside them.
"""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402

import torch  # noqa: E402

PLACES = ("first", "middle", "last")


def contexts_for(batch: int, context: int, long: int, place: str | None) -> list[int]:
    """`batch` contexts of `context` tokens, one of them `long` at `place` (None: uniform)."""
    lens = [context] * batch
    if place is not None:
        lens[{"first": 0, "middle": batch // 2, "last": batch - 1}[place]] = long
    return lens


def measure(batches, context: int, long: int, shape: tuple[int, int, int], device: torch.device, sms: int,
            reps: int, kernel=None, time_fn=None, block_size: int = 16) -> dict:
    """{"program_s_per_token", "rows": [one per batch: splits, uniform/first/middle/last seconds, model_tail_s]}.
    `kernel(q, k, v, tables, lens, num_splits)` and `time_fn(fn, device, reps)` default to the engine's Triton
    kernel timed in a CUDA graph (tests pass CPU stand-ins)."""
    import numpy as np

    from policies.specs import decode_context_splits
    from real.profile import decode_program_rows, graphed_s
    from real.testing import decode_batch, scattered_block_tables

    heads, kv_heads, head_dim = shape
    if kernel is None:
        from real.attention import decode_kernel_config
        from real.triton_kernels import paged_decode_triton

        block_n, warps, stages = decode_kernel_config()
        kernel = lambda q, k, v, t, lens, splits: paged_decode_triton(  # noqa: E731
            q, k, v, t, lens, head_dim ** -0.5, block_n=block_n, num_splits=splits, num_warps=warps,
            num_stages=stages)
    time_fn = time_fn or graphed_s
    program = decode_program_rows(heads, kv_heads, head_dim, device, sms, reps,
                                  kernel=lambda q, k, v, t, lens: kernel(q, k, v, t, lens, 1), time_fn=time_fn)
    ctx = np.array([r["context"] for r in program], dtype=float)
    sec = np.array([r["seconds"] for r in program], dtype=float)
    per_token = float(np.polyfit(ctx, sec, 1)[0]) if len(set(ctx)) > 1 else float("nan")
    rows = []
    for batch in batches:
        splits = decode_context_splits(batch * kv_heads, sms)
        row = dict(batch=batch, context=context, long=long, splits=splits, programs=batch * kv_heads * splits)
        worst = contexts_for(batch, context, long, "first")
        blocks = sum(-(-c // block_size) for c in worst) + 8
        k = torch.randn(blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device=device)
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device=device)
        for place in (None,) + PLACES:
            lens = contexts_for(batch, context, long, place)
            tables = scattered_block_tables(lens, block_size, blocks)
            meta, _ = decode_batch(lens, tables, block_size, device=device)
            row[f"{place or 'uniform'}_s"] = time_fn(
                lambda: kernel(q, k, v, meta.block_tables, meta.context_lens, splits), device, reps)
        mean = sum(contexts_for(batch, context, long, "first")) / batch
        row["model_tail_s"] = per_token * (long - mean) / splits
        rows.append(row)
    return dict(program_s_per_token=per_token, program_rows=program, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 192, 256],
                    help="decode batches (default: graph buckets 32 64 128 192 256)")
    ap.add_argument("--context", type=int, default=1024, help="every other sequence's context (default 1024)")
    ap.add_argument("--long", type=int, default=4096, help="the long sequence's context (default 4096)")
    ap.add_argument("--model", default="qwen3-0.6b", help="head shape: qwen3-0.6b or qwen3-8b")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out", default=None, help="JSON (default bench/results/decode_tail_order_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_tail_order needs a CUDA GPU (the engine's Triton kernel, timed in CUDA graphs)", file=sys.stderr)
        return 2
    if args.long <= args.context:
        ap.error("--long must exceed --context")
    from policies.specs import model_spec

    spec = model_spec(args.model)
    shape = (spec.num_heads, spec.num_kv_heads, spec.head_dim)
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    got = measure(args.batches, args.context, args.long, shape, device, sms, args.reps)
    print(f"one program streams 1k tokens in {got['program_s_per_token'] * 1e9:.1f} us per layer; "
          f"one layer's kernel, ms (one sequence of {args.long} among {args.context}-token ones):")
    print(f"{'batch':>5} {'splits':>6} {'programs':>8} {'uniform':>8} {'first':>7} {'middle':>7} {'last':>7} "
          f"{'tail (first-uni)':>16} {'model tail':>10} {'delay (last-first)':>18}")
    for r in got["rows"]:
        ms = {k: r[k] * 1e3 for k in ("uniform_s", "first_s", "middle_s", "last_s", "model_tail_s")}
        print(f"{r['batch']:>5} {r['splits']:>6} {r['programs']:>8} {ms['uniform_s']:8.3f} {ms['first_s']:7.3f} "
              f"{ms['middle_s']:7.3f} {ms['last_s']:7.3f} {ms['first_s'] - ms['uniform_s']:16.3f} "
              f"{ms['model_tail_s']:10.3f} {ms['last_s'] - ms['first_s']:18.3f}")
    name = torch.cuda.get_device_name(device)
    out = results_path(args.out, "decode_tail_order", name)
    write_results(out, dict(gpu=name, date=date.today().isoformat(), command=" ".join(sys.argv), sms=sms,
                            model=args.model, **got))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
