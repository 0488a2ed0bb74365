"""python bench/copy_rows.py PROFILE: measure the decode_copy rows on this two-GPU node and write them into
PROFILE (replacing any it has), for a profile measured before real.profile wrote them.

A decode_copy row is what one request's KV copy into the decode GPU adds to the decode steps it overlaps
(real/profile.py, copy_beside_decode_rows): a difference of two timings taken side by side, so it transfers
between machines of one GPU type better than an absolute time. The profile's metadata says where and when
the rows were measured (`decode_copy_rows`), and the sim reads them (sim/calibrated.py, copy_interference_s).
--from-profile SRC takes the rows from another profile instead (no GPU): a what-if for a profile whose node
was not measured, which the metadata says.
"""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="profile CSV to add the rows to (its model is measured)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per point (pairs: 3 x reps)")
    ap.add_argument("--out", default=None, help="write the merged profile here instead (default: in place)")
    ap.add_argument("--from-profile", default=None, metavar="SRC",
                    help="take the rows from profile SRC instead of measuring (no GPU needed; the metadata names SRC)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from traces.profile import read_profile

    df, meta = read_profile(args.profile)
    if args.from_profile:
        src_df, src_meta = read_profile(args.from_profile)
        rows = _plain(src_df[src_df["op"] == "decode_copy"].to_dict("records"))
        if not rows:
            print(f"{args.from_profile} has no decode_copy rows", file=sys.stderr)
            return 2
        source = dict(gpu=src_meta.get("gpu"), date=src_meta.get("date"), kv_transport=src_meta.get("kv_transport"),
                      from_profile=args.from_profile)
        return _write(args, df, meta, rows, source)
    import torch

    from real.config import EngineConfig
    from real.profile import copy_beside_decode_rows, profile_runner

    if torch.cuda.device_count() < 2:
        print("copy_rows needs two GPUs (the copy goes from the other GPU into the measured one)", file=sys.stderr)
        return 2
    device, other = torch.device("cuda:0"), torch.device("cuda:1")
    gpu = torch.cuda.get_device_name(device)
    if meta.get("gpu") and meta["gpu"] != gpu:
        print(f"warning: the profile was measured on {meta['gpu']}, this node has {gpu}", file=sys.stderr)
    runner = profile_runner(meta.get("model", "qwen3-0.6b"), device, 256, 1024, 524288)
    src = torch.zeros((*runner.kv_cache.shape[:2], 4096 // runner.block_size + 1, *runner.kv_cache.shape[3:]),
                      dtype=runner.kv_cache.dtype, device=other)
    rows, mode = copy_beside_decode_rows(runner, src, EngineConfig().kv_transport, args.reps)
    runner.close()
    for r in rows:
        print(f"batch {r['batch']:4d}, copy of {r['tokens']:5d} tokens ({r['bytes'] / 2**20:6.1f} MiB): "
              f"+{r['seconds'] * 1e3:.3f} ms")
    return _write(args, df, meta, rows, dict(gpu=gpu, date=date.today().isoformat(), kv_transport=mode))


def _plain(records: list[dict]) -> list[dict]:
    """Profile rows as read back, without the NaN spread cells of ops that have none."""
    return [{k: v for k, v in r.items() if not (isinstance(v, float) and v != v)} for r in records]


def _write(args, df, meta: dict, rows: list[dict], source: dict) -> int:
    from traces.profile import write_profile

    kept = _plain([r for r in df.to_dict("records") if r["op"] != "decode_copy"])
    meta["decode_copy_rows"] = dict(source, command="python bench/copy_rows.py " + " ".join(args.argv))
    out = write_profile(args.out or args.profile, kept + rows, meta)
    print(f"{len(rows)} decode_copy rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
