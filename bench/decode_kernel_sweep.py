"""Sweep the paged-decode Triton kernel's tile configuration on this GPU (issue 3: the decode kernel).

    python bench/decode_kernel_sweep.py --out bench/results/decode_kernel_<gpu>.json

One attention layer's decode (the kernel alone, timed in CUDA graphs of 10 calls, median of 25) for the qwen3-0.6b
(GQA group 2) and qwen3-8b (group 4) head shapes, batch 64 and 256, 1024-token contexts and mixed
100..2048-token contexts, KV block sizes 16 and 64, over tokens per tile (BLOCK_N) x warps x pipeline
stages. Reports each case's KV bandwidth (bytes of K and V read / kernel time) as a fraction of the
device copy bandwidth measured in the same call (read + write), and the configuration with the best
geometric-mean time over the cases: `REAL_DECODE_KERNEL=block_n,warps,stages` selects it at run time.
"""
from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402

import torch  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8, 128), "qwen3-8b": (32, 8, 128)}  # heads, kv heads, head dim


def _time(fn, n: int, per_graph: int = 10) -> float:
    """Median seconds per call: `per_graph` calls captured in one CUDA graph, replayed n times between CUDA
    events (single event-timed launches measured the host's ~70 us launch cost at small batches, not the kernel)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / per_graph)
    return sorted(times)[len(times) // 2]


def make_case(model: str, batch: int, contexts: str, block_size: int, seed: int = 0):
    from real.testing import decode_batch, scattered_block_tables

    heads, kv_heads, head_dim = SHAPES[model]
    rng = random.Random(seed)
    if contexts == "1024":
        lens = [1024] * batch
    elif contexts == "tail":  # serving's shape: mostly ~1k, one in 16 (at least one) at 6k
        lens = [6144 if i % 16 == 0 else rng.randint(512, 1536) for i in range(batch)]
    else:
        lens = [rng.randint(100, 2048) for _ in range(batch)]
    num_blocks = sum(-(-n // block_size) for n in lens) + 8
    tables = scattered_block_tables(lens, block_size, num_blocks, seed=seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    meta, _ = decode_batch(lens, tables, block_size, pad_to=batch, device="cuda")
    kv_bytes = 2 * sum(lens) * kv_heads * head_dim * 2
    return q, k, v, meta, kv_bytes


def sweep_splits(bw: float, splitter) -> dict:
    """Context splits per (sequence, kv head) at the run-time tile, against the backend's choice: few
    programs (small batches) leave SMs idle, a last partial wave of programs leaves them idle too. Also
    splits by length ("len xK": the chosen count at the mean context, up to K times it for longer ones;
    REAL_DECODE_LENGTH_SPLITS=K) on uniform, mixed and tail-heavy (one 6k context in 16) batches."""
    from real.attention import paged_decode_triton

    table = {}
    for model, batch, contexts in itertools.product(SHAPES, (8, 16, 32, 64, 128, 256), ("1024", "mixed", "tail")):
        q, k, v, meta, kv_bytes = make_case(model, batch, contexts, 16)
        chosen = splitter.num_splits(batch * k.shape[2], q.device)
        row = {}
        variants = [(str(s), s, 0) for s in sorted({1, 2, 3, 4, 6, 8, 16, chosen})]
        variants += [(f"len x{m}", chosen, min(16, chosen * m)) for m in (2, 4, 8) if chosen * m <= 16]
        for label, splits, max_splits in variants:
            t = _time(lambda: paged_decode_triton(q, k, v, meta.block_tables, meta.context_lens, 0.088,
                                                  block_n=splitter.block_n, num_splits=splits,
                                                  num_warps=splitter.num_warps, num_stages=splitter.num_stages,
                                                  max_splits=max_splits), 25)
            row[label] = dict(us=t * 1e6, fraction=kv_bytes / t / bw)
        best = min(row, key=lambda c: row[c]["us"])
        name = f"{model}/b{batch}/ctx{contexts}"
        print(f"{name:28s} programs {batch * k.shape[2]:5d}  chosen {chosen:2d}: {row[str(chosen)]['fraction']:.2f}  "
              f"best {best:>5s}: {row[best]['fraction']:.2f}  " + " ".join(f"{c}:{row[c]['us']:.0f}" for c in row),
              flush=True)
        table[name] = dict(programs=batch * k.shape[2], chosen=chosen, best=best, configs=row)
        del q, k, v, meta
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--only-splits", action="store_true", help="skip the tile sweep; measure context splits only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from engine_single import copy_bandwidth  # the same device-copy roof as the single-GPU bench
    from real.attention import TritonAttention, paged_decode_triton

    gpu = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s", flush=True)
    tiles = [32, 64] if args.quick else [32, 64, 128]
    warps = [4] if args.quick else [2, 4, 8]
    stages = [2] if args.quick else [2, 3, 4]
    configs = list(itertools.product(tiles, warps, stages))
    splitter = TritonAttention()
    cases, table = [], {}
    tile_cases = [] if args.only_splits else list(itertools.product(SHAPES, (64, 256), ("1024", "mixed"), (16, 64)))
    for model, batch, contexts, block_size in tile_cases:
        q, k, v, meta, kv_bytes = make_case(model, batch, contexts, block_size)
        splits = splitter.num_splits(batch * k.shape[2], q.device)
        name = f"{model}/b{batch}/ctx{contexts}/bs{block_size}"
        ref = None
        row = {}
        for bn, w, st in configs:
            def call():
                return paged_decode_triton(q, k, v, meta.block_tables, meta.context_lens, 0.088, block_n=bn,
                                           num_splits=splits, num_warps=w, num_stages=st)
            try:
                out = call()
                if ref is None:
                    ref = out.float()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if err > 1e-2:
                    raise RuntimeError(f"result differs from the first configuration (rel err {err:.1e})")
                t = _time(call, 25)
            except Exception as e:  # a configuration this GPU/compiler rejects (shared memory): skip it
                row[f"{bn},{w},{st}"] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
                continue
            row[f"{bn},{w},{st}"] = dict(us=t * 1e6, fraction=kv_bytes / t / bw)
        best = min((c for c in row if "us" in row[c]), key=lambda c: row[c]["us"])
        print(f"{name:34s} splits {splits:2d}  default 64,4,2: {row['64,4,2']['fraction']:.2f}  "
              f"best {best}: {row[best]['fraction']:.2f} ({row[best]['us']:.1f} us)", flush=True)
        table[name] = dict(kv_bytes=kv_bytes, splits=splits, configs=row, best=best)
        cases.append(name)
        del q, k, v, meta
        torch.cuda.empty_cache()
    split_table = sweep_splits(bw, splitter)
    if not cases:
        results = dict(gpu=gpu, date=date.today().isoformat(), torch=torch.__version__, copy_bandwidth_bytes_per_s=bw,
                       command="python bench/decode_kernel_sweep.py " + " ".join(sys.argv[1:]), splits=split_table)
        write_results(results_path(args.out, "decode_splits", gpu), results)
        return 0
    ok = [c for c in (f"{bn},{w},{st}" for bn, w, st in configs) if all("us" in table[n]["configs"][c] for n in cases)]
    geo = {c: math.exp(sum(math.log(table[n]["configs"][c]["us"]) for n in cases) / len(cases)) for c in ok}
    overall = min(geo, key=geo.get)
    results = dict(gpu=gpu, date=date.today().isoformat(),
                   command="python bench/decode_kernel_sweep.py " + " ".join(sys.argv[1:]), torch=torch.__version__,
                   copy_bandwidth_bytes_per_s=bw, cases=table, geomean_us=geo, best_overall=overall,
                   speedup_best_over_default=geo["64,4,2"] / geo[overall], splits=split_table)
    print(f"best overall {overall}: geomean {geo[overall]:.1f} us vs default 64,4,2 {geo['64,4,2']:.1f} us "
          f"({results['speedup_best_over_default']:.2f}x)", flush=True)
    print(f"REAL_DECODE_KERNEL={overall}", flush=True)
    write_results(results_path(args.out, "decode_kernel", gpu), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
