"""How to move one request's KV blocks GPU0 -> GPU1 fastest (issue 4: KV transfer >= 80% of a plain copy).

    python bench/kv_transfer_sweep.py --out bench/results/kv_transfer_<gpu>.json

qwen3-0.6b cache layout, 8192-token request (512 blocks of 16 tokens, 28 layers, K and V: 940 MB), block ids
contiguous and scattered. Compares a plain 1 GB copy; the engine's gather/copy/scatter transport at several
layer-group sizes; and one Triton kernel that copies every (block, layer, K/V) piece through peer access,
launched on GPU0 (push: remote writes; also with a bounded grid that leaves SMs to the prefill) or GPU1
(pull: remote reads). Wall time from start to both GPUs idle, best of 6.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import results_path, write_results  # noqa: E402

import torch  # noqa: E402


def sync():
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")


def best_gbps(fn, nbytes: int, n: int = 6) -> float:
    fn()
    sync()
    best = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print("error: needs 2 GPUs", file=sys.stderr)
        return 2
    from policies.request import Request
    from real.transfer import BlockCopyTransport, enable_peer_access
    from real.triton_kernels import copy_blocks_triton

    gpu = torch.cuda.get_device_name(0)
    results = dict(gpu=gpu, date=date.today().isoformat(), torch=torch.__version__,
                   command="python bench/kv_transfer_sweep.py " + " ".join(sys.argv[1:]), tokens=args.tokens)
    from pd_bench import plain_copy_gbps  # the same plain-copy baseline as the pd bench

    results["plain_copy_gbps"] = plain_copy_gbps()
    print(f"{gpu}: plain 1 GB copy {results['plain_copy_gbps']:.0f} GB/s", flush=True)
    results["peer_access"] = enable_peer_access(torch.device("cuda:0"), torch.device("cuda:1"))
    layers, bs, kv, hd, nblocks = 28, 16, 8, 128, 4096
    src = torch.randn(2, layers, nblocks, bs, kv, hd, dtype=torch.bfloat16, device="cuda:0")
    dst = torch.zeros(2, layers, nblocks, bs, kv, hd, dtype=torch.bfloat16, device="cuda:1")
    n = args.tokens // bs
    nbytes = n * src[:, :, 0].numel() * src.element_size()
    rng = random.Random(0)
    layouts = {"contiguous": (list(range(n)), list(range(100, 100 + n))),
               "scattered": (rng.sample(range(nblocks), n), rng.sample(range(nblocks), n))}
    rows = {}
    for layout, (sb, db) in layouts.items():
        def check(name):
            dst.zero_()
            sync()  # a push from GPU0 is not ordered after GPU1's zeroing
            rows[f"{layout}/{name}"]["fn"]()
            sync()
            ok = torch.equal(dst[:, :, db[:64]].cpu(), src[:, :, sb[:64]].cpu())
            rows[f"{layout}/{name}"]["correct"] = ok
        transports = {f"transport_copy_{mb}MB": BlockCopyTransport(src, dst, chunk_bytes=mb << 20, mode="copy")
                      for mb in (32, 128, 512)}
        for m in ("push", "pull"):
            try:
                transports[f"transport_{m}"] = BlockCopyTransport(src, dst, mode=m)
            except RuntimeError as e:  # no peer access or no Triton here: the copy rows still stand
                results.setdefault("unavailable", {})[m] = str(e)
        for name, t in transports.items():
            r = Request(1, 0.0, args.tokens, 1)
            r.blocks, r.dst_blocks = sb, db

            def run(t=t, r=r):  # the engine's path: host work of start() included
                t.start(r)
                while not t.poll():
                    pass
            rows[f"{layout}/{name}"] = dict(fn=run)
        for where in ("push", "pull"):
            dev = torch.device("cuda:0" if where == "push" else "cuda:1")
            si = torch.tensor(sb, dtype=torch.long, device=dev)
            di = torch.tensor(db, dtype=torch.long, device=dev)
            for programs in (0, 132):
                rows[f"{layout}/triton_{where}_programs{programs or 'all'}"] = dict(
                    fn=lambda si=si, di=di, dev=dev, p=programs: copy_blocks_triton(src, dst, si, di, dev,
                                                                                  max_programs=p))
        for name in [k.split("/", 1)[1] for k in rows if k.startswith(layout + "/")]:
            key = f"{layout}/{name}"
            try:
                check(name)
                rows[key]["gbps"] = best_gbps(rows[key]["fn"], nbytes)
                rows[key]["fraction_of_plain"] = rows[key]["gbps"] / results["plain_copy_gbps"]
            except Exception as e:
                rows[key]["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows[key].pop("fn")
            print(f"{key:36s} {rows[key]}", flush=True)
    results["variants"] = rows
    write_results(results_path(args.out, "kv_transfer", gpu), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
