"""Decode steps between CUDA-graph buckets, measured and modelled (issue 6).

The engine replays a decode step of n sequences in its smallest graph bucket >= n (real/graphs.py); a pipelined
graph runs two micro-batches of half the *bucket* each (40 sequences: 24 + 16 real rows in halves of 48). The
profile times steps at a few buckets and the simulator interpolates between them (sim/calibrated.py), so a step
of 40 sequences is read off the line from 32 to 64 (or 48, where the profile has that knot). How far off is that?

    python bench/step_between_buckets.py measure --device cuda:1 --out OUT.json  # one GPU, ~1-2 min
    python bench/step_between_buckets.py check OUT.json [--profile P]  # CPU: the model against it

`measure` times, with real.profile's method (median wall time of ModelRunner.run, input staging included, the
engine's graphs), the sequential step and the pipelined one on each split at uniform contexts, for batches at and
between buckets. `check` reads each against the calibrated cost model three ways:
  interp      the model as it is: rows interpolated in batch at the step's own context
  bucket_kv   the step at its graph bucket with the same KV (the padding rows read none; their matmul rows run)
  bucket_ctx  the step at its graph bucket at the step's context (as if the padding rows were sequences)
and prints model / measured per row and the mean |error| per way, sequential and pipelined apart. The profile is
another process (a GPU's speed moves 3-5% between processes), so it also reads the steps between buckets off the
run's own steps at the buckets (`within_run`: interp and bucket_kv, no profile).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (20, 24, 28, 32, 33, 40, 48, 56, 64, 65, 80, 96, 100, 112, 128)
CONTEXTS = (512, 1024, 2048)
SPLITS = ((32, 100), (64, 68), (96, 36))  # the fidelity runs' splits (--split-step 32)
WAYS = ("interp", "bucket_kv", "bucket_ctx")


def measure(model: str, batches, contexts, splits, reps: int, device: str) -> dict:
    """Rows (batch, context, split or None, seconds) timed as real.profile times its decode and pipeline rows
    (on CPU, no graphs and no partitions: a dry run of the code path)."""
    import contextlib

    import torch

    from real.green import SmPartitions
    from real.profile import median_s, profile_runner
    from real.testing import fake_decode_batch

    device = torch.device(device)
    budget = max(b * (c + 16) for b in batches for c in contexts) + 4096
    rows = []
    on = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), on:
        runner = profile_runner(model, device, max(batches), max(contexts), budget)
        runner.enable_pipeline(SmPartitions(device, list(splits)), list(splits), 2)
        t0 = time.perf_counter()
        for b in batches:
            for c in contexts:
                batch = fake_decode_batch(runner, b, c)
                rows.append(dict(batch=b, context=c, split=None,
                                 seconds=median_s(lambda: runner.run(batch, {}), device, reps)))
                for split in splits:
                    rows.append(dict(batch=b, context=c, split=list(split),
                                     seconds=median_s(lambda: runner.run(batch, {}, split, 2), device, reps)))
            seq = [r["seconds"] * 1e3 for r in rows[-len(contexts) * (len(splits) + 1):] if r["split"] is None]
            bucket = runner.graphs.bucket(b) if runner.graphs is not None else b
            print(f"batch {b} (bucket {bucket}): sequential "
                  + " / ".join(f"{s:.3f}" for s in seq) + f" ms at contexts {list(contexts)}  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        buckets = sorted(runner.graphs.graphs) if runner.graphs is not None else []
        runner.close()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(gpu=gpu, device=str(device), torch=torch.__version__,
                model=model, reps=reps, graph_buckets=buckets, rows=rows)


def modelled_s(cost, way: str, b: int, c: int, split) -> float:
    """The step `way` reads for b sequences of c cached tokens (see the module docstring)."""
    bucket = cost.graph_batch(b)
    at, kv = {"interp": (b, b * c), "bucket_kv": (bucket, b * c), "bucket_ctx": (bucket, bucket * c)}[way]
    split = tuple(split) if split else None
    return cost.decode_step(at, kv, split, 2 if split else 1).step_s


def kind_of(split) -> str:
    """A row's kind: "seq", or its split as "attn:ffn"."""
    return "seq" if split is None else f"{split[0]}:{split[1]}"


def check(results: dict, cost):
    import pandas as pd

    rows = []
    for r in results["rows"]:
        b, c, split = r["batch"], r["context"], r["split"]
        row = dict(batch=b, bucket=cost.graph_batch(b), context=c,
                   split=kind_of(split), measured_ms=r["seconds"] * 1e3)
        for way in WAYS:
            row[way] = modelled_s(cost, way, b, c, split) * 1e3 / row["measured_ms"]
        rows.append(row)
    df = pd.DataFrame(rows)
    df["at_bucket"] = df.batch == df.bucket
    df["kind"] = df.split.where(df.split == "seq", "pipelined")
    return df


def summary(df) -> dict:
    """Mean |model / measured - 1| per way, by kind (seq, pipelined) and at / between buckets; and the pipelined
    ratio over the sequential one at the same shape (what is left once a process's speed cancels)."""
    out = {}
    for (kind, at), g in df.groupby(["kind", "at_bucket"]):
        out[f"{kind}_{'at' if at else 'between'}_buckets"] = {w: round(float((g[w] - 1).abs().mean()), 4) for w in WAYS}
    seq = df[df.kind == "seq"][["batch", "context", *WAYS]]
    pipe = df[df.kind == "pipelined"].merge(seq, on=["batch", "context"], suffixes=("", "_seq"))
    for at, g in pipe.groupby("at_bucket"):
        out[f"pipelined_over_seq_{'at' if at else 'between'}_buckets"] = {
            w: round(float((g[w] / g[f"{w}_seq"] - 1).abs().mean()), 4) for w in WAYS}
    return out


def within_run(results: dict) -> dict:
    """The same question without the profile: each step between buckets against the run's own steps at the buckets
    around it (one process, so a process's speed cancels), read `interp` (linear in batch between the two buckets'
    steps at the same context) and `bucket_kv` (the upper bucket's step at context b x c / bucket, linear in context
    over the run's contexts, extended along the first two's line below them). Mean |read / measured - 1| and its
    signed mean per kind; None for a kind without steps between two measured buckets."""
    import numpy as np

    buckets = set(results.get("graph_buckets") or [])
    at = {(kind_of(r["split"]), r["batch"], r["context"]): r["seconds"] for r in results["rows"]}
    measured_buckets = sorted({b for _, b, _ in at} & buckets)
    contexts = sorted({c for _, _, c in at})

    def at_context(kind, b, c):
        ys = [at[(kind, b, x)] for x in contexts]
        if c >= contexts[0] or len(contexts) < 2:
            return float(np.interp(c, contexts, ys))
        return ys[0] + (ys[1] - ys[0]) * (c - contexts[0]) / (contexts[1] - contexts[0])

    errs: dict = {k: {"interp": [], "bucket_kv": []} for k, _, _ in at}
    for (k, b, c), v in at.items():
        lo = max((x for x in measured_buckets if x < b), default=None)
        hi = min((x for x in measured_buckets if x >= b), default=None)
        if b in buckets or lo is None or hi is None:
            continue
        interp = at[(k, lo, c)] + (at[(k, hi, c)] - at[(k, lo, c)]) * (b - lo) / (hi - lo)
        errs[k]["interp"].append(interp / v - 1)
        errs[k]["bucket_kv"].append(at_context(k, hi, b * c / hi) / v - 1)
    return {k: {w: dict(mean_abs=round(float(np.mean(np.abs(e))), 4), signed=round(float(np.mean(e)), 4), n=len(e))
                for w, e in ways.items()} if ways["interp"] else None
            for k, ways in sorted(errs.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the steps (one CUDA GPU with green contexts)")
    m.add_argument("--model", default="qwen3-0.6b")
    m.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    m.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    m.add_argument("--reps", type=int, default=9, help="timed runs per point (median)")
    m.add_argument("--device", default="cuda:0", help="where (the profile's decode rows ran on its decode GPU, cuda:1 "
                                                      "on two GPUs; cpu: a dry run of the code path)")
    m.add_argument("--out", required=True)
    c = sub.add_parser("check", help="read a measure JSON against the calibrated cost model (CPU)")
    c.add_argument("results")
    c.add_argument("--profile", default=None, help="profile CSV (default: the committed one for the GPU)")
    c.add_argument("--json", default=None, help="write the rows and the summary here")
    args = ap.parse_args(argv)
    command = "python bench/step_between_buckets.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.cmd == "measure":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("measure needs a CUDA GPU with green contexts (or --device cpu: a dry run)", file=sys.stderr)
            return 2
        res = measure(args.model, args.batches, args.contexts, SPLITS, args.reps, args.device)
        res.update(date=str(date.today()), command=command)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print("wrote", args.out)
        return 0
    import pandas as pd

    from real.profile import hardware_preset
    from sim.cost_model import make_cost_model
    from traces.profile import default_profile_path

    res = json.loads(Path(args.results).read_text())
    hardware = hardware_preset(res["gpu"])
    profile = args.profile or str(default_profile_path(hardware, res["model"]))
    df = check(res, make_cost_model(hardware, res["model"], kind="calibrated", profile=profile))
    pd.set_option("display.width", 200)
    print(df.drop(columns=["kind"]).round(3).to_string(index=False))
    s = summary(df)
    for k, v in s.items():
        print(f"{k:36s} " + "  ".join(f"{w} {e:.3f}" for w, e in v.items()))
    own = within_run(res)
    print("within the run (steps between buckets read off the run's own bucket steps; mean |err|, signed):")
    for kind, v in own.items():
        print(f"  {kind:8s} " + ("no steps between measured buckets" if v is None else
                                 "  ".join(f"{w} {e['mean_abs']:.3f} ({e['signed']:+.3f})" for w, e in v.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(date=str(date.today()), gpu=res["gpu"], measured=res["command"],
                                                   profile=profile, command=command, mean_abs_rel_err=s,
                                                   within_run=own,
                                                   rows=df.round(4).to_dict(orient="records")), indent=1))
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
