"""Replay served decode batches in the engine, alone (issue 6): is single's big-batch miss in the step itself?

    python bench/decode_mix_replay.py export RUN_DIR_OR_TGZ --profile PROFILE.csv --out MIXES.json   # CPU
    python bench/decode_mix_replay.py measure MIXES.json --out bench/results/decode_mix_replay_<gpu>.json  # 1 GPU

In session 15's single runs (2x H200), GPU0 decode steps of 129-256 sequences with one sequence past ~4,000
tokens took 4-5 ms more than the sim's model of them (the step at the batch's mean context + the decode tail of
its longest sequence), where steps of <= 128 sequences with the same long sequence, and steps of 129-256 with
none past 2,500 tokens, were within 0.3 ms (bench/fidelity_diagnose.py colocated_beyond_model). The jump sits
between 128 and 129 sequences. bench/decode_tail_order.py found no such jump in the paged-decode kernel on
uniform 1,024-token batches with one long sequence, wherever it sat in the grid.

`export` picks served steps (GPU0 decode steps, by decode batch and longest context, a few of each) from a real
run and writes each one's contexts (reconstructed from requests.csv, in join order: fidelity_diagnose.
decoding_contexts), its real period and the sim's model of it (with the model's tail), so the GPU side needs
neither the simulator nor the trace. `measure` times each step whole, as the profile's decode rows are timed
(runner.run on a fake batch, CUDA graphs), in four forms: the served contexts on contiguous blocks, the same on
blocks scattered over the whole KV pool (as a served cache is), the contexts sorted longest first, and every
sequence at the batch's mean context. `served - uniform` is the step's measured tail, to set beside the
model's tail and the served steps' excess over the model.

Measured (1x H200, session 16; bench/results/decode_mix_replay_NVIDIA_H200.json): session 15's steps of 129-160
sequences with a 4k+-token sequence took 15.99 ms served against 9.61 modelled and 8.80 replayed (9.23 on
scattered blocks, 8.79 longest first); 161-192: 16.71 / 11.89 / 10.71; 225-256: 18.07 / 16.36 / 14.69. The step
alone runs at or under the model: the served excess was not in the step's shape.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_io import results_path, write_results  # noqa: E402

BATCH_BINS = ((96, 128), (128, 160), (160, 192), (224, 256))  # (lo, hi] decode sequences
LONGEST_BINS = ((0, 2500), (4000, 1 << 20))  # (lo, hi] the longest decoding context, tokens
POOL_TOKENS = 1 << 19  # the KV pool replayed into: the profile's token budget
FORMS = ("served", "scattered", "longest_first", "uniform")


def _run_dir(path: Path) -> Path:
    """A run folder, or the `single` run of a fidelity_bench archive (extracted to a temporary folder)."""
    from fidelity_bench import extract_runs

    if path.is_dir():
        return path
    for run in extract_runs(path, Path(tempfile.mkdtemp(prefix="mix-replay-"))):
        if json.loads((run / "run.json").read_text()).get("policy") == "single":
            return run
    raise SystemExit(f"{path}: no single run in the archive (decode on GPU0 is what this replays)")


def export_mixes(run: Path, cost, per_bin: int = 5, seed: int = 0) -> list[dict]:
    """Up to `per_bin` GPU0 decode steps of each (decode batch, longest context) bin, at random: their
    contexts (join order), real period and the sim's model (ms)."""
    import numpy as np
    import pandas as pd

    from fidelity_diagnose import colocated_step_frame, decoding_contexts

    frame = colocated_step_frame(run, cost)
    steps = pd.read_csv(run / "steps.csv")
    g = steps[(steps.device == "gpu0") & steps.stage.isin(["decode", "mixed"])].sort_values("t_start_s")
    contexts = decoding_contexts(pd.read_csv(run / "requests.csv"), g.t_start_s.to_numpy(), "gpu0")
    frame = frame.assign(longest=[c.max() if len(c) else 0.0 for c in contexts], t=g.t_start_s.to_numpy())
    frame["mean"] = [c.mean() if len(c) else 0.0 for c in contexts]
    rng = np.random.default_rng(seed)
    mixes = []
    for lo, hi in BATCH_BINS:
        for clo, chi in LONGEST_BINS:
            pick = frame[(frame.stage == "decode") & (frame.decodes > lo) & (frame.decodes <= hi)
                         & (frame.longest > clo) & (frame.longest <= chi)]
            for i in sorted(rng.choice(pick.index, size=min(per_bin, len(pick)), replace=False)):
                row, ctx = frame.loc[i], contexts[i]
                b, kv, m = int(row.decodes), int(row.kv), int(row.longest)
                mixes.append(dict(t_start_s=round(float(row.t), 6), decodes=b, kv_tokens=kv, longest=m,
                                  mean_context=round(float(row["mean"]), 1), real_ms=round(row.real * 1e3, 4),
                                  model_ms=round(row.model * 1e3, 4),
                                  model_tail_ms=round(cost.decode_tail_s(b, kv + b, m) * 1e3, 4),
                                  contexts=[int(round(c)) for c in ctx]))
    return mixes


def scatter_blocks(batch, num_blocks: int, seed: int = 0) -> None:
    """Give every sequence of `batch` blocks drawn at random from the whole pool (a served cache's layout)."""
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    start = 0
    for r in batch.decode:
        r.blocks = pool[start:start + len(r.blocks)]
        start += len(r.blocks)


def measure(mixes: list[dict], runner, reps: int, time_fn=None) -> list[dict]:
    """Each mix's step time (seconds) in each of FORMS on `runner` (time_fn(fn, device, reps) defaults to
    real.profile.median_s, as the profile's decode rows)."""
    from real.testing import fake_decode_batch

    if time_fn is None:
        from real.profile import median_s as time_fn
    device = runner.kv_cache.device
    num_blocks = runner.kv_cache.shape[2]
    out = []
    for k, mix in enumerate(mixes):
        ctx = mix["contexts"]
        n = len(ctx)
        mean = max(1, round(sum(ctx) / n))
        forms = dict(served=ctx, scattered=ctx, longest_first=sorted(ctx, reverse=True), uniform=[mean] * n)
        row = {key: mix[key] for key in mix if key != "contexts"}
        for form, lens in forms.items():
            batch = fake_decode_batch(runner, n, lens)
            if form == "scattered":
                scatter_blocks(batch, num_blocks, seed=k)
            row[f"{form}_s"] = time_fn(lambda: runner.run(batch, {}), device, reps)
        out.append(row)
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Per (decode batch bin, longest bin): medians in ms of the served steps' real period and excess over the
    model, the model's tail, and the replay's forms and measured tail (served - uniform)."""
    import pandas as pd

    d = pd.DataFrame(rows)
    for f in FORMS:
        d[f"{f}_ms"] = d[f"{f}_s"] * 1e3
    d["beyond_served_ms"] = d.real_ms - d.model_ms
    d["replay_tail_ms"] = d.served_ms - d.uniform_ms
    d["batch_bin"] = pd.cut(d.decodes, pd.IntervalIndex.from_tuples(list(BATCH_BINS))).astype(str)
    d["longest_bin"] = pd.cut(d.longest, [0, 2500, 4000, 1 << 20]).astype(str)
    cols = ["real_ms", "model_ms", "beyond_served_ms", "model_tail_ms", "served_ms", "scattered_ms",
            "longest_first_ms", "uniform_ms", "replay_tail_ms"]
    agg = d.groupby(["batch_bin", "longest_bin"], observed=True)[cols].median().round(3)
    agg.insert(0, "steps", d.groupby(["batch_bin", "longest_bin"], observed=True).size())
    return [dict(batch_bin=b, longest_bin=lb, **r.to_dict()) for (b, lb), r in agg.iterrows()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="pick served steps from a real single run (CPU)")
    ex.add_argument("run", help="a real run folder, or a fidelity_bench archive (its single run)")
    ex.add_argument("--profile", required=True, help="the profile the sim models the run with")
    ex.add_argument("--model", default="qwen3-0.6b")
    ex.add_argument("--per-bin", type=int, default=5, help="steps per (batch, longest context) bin (default 5)")
    ex.add_argument("--out", required=True)
    me = sub.add_parser("measure", help="time the exported steps in the engine (one GPU)")
    me.add_argument("mixes")
    me.add_argument("--model", default="qwen3-0.6b")
    me.add_argument("--reps", type=int, default=15)
    me.add_argument("--out", default=None, help="JSON (default bench/results/decode_mix_replay_<gpu>.json)")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        from sim.cost_model import make_cost_model

        run = _run_dir(Path(args.run))
        info = json.loads((run / "run.json").read_text())
        hardware = "h200x2" if "H200" in info["hardware"]["device"] else "h100x2"
        cost = make_cost_model(hardware, args.model, kind="calibrated", profile=args.profile)
        mixes = export_mixes(run, cost, args.per_bin)
        Path(args.out).write_text(json.dumps(dict(run=str(args.run), profile=args.profile, hardware=hardware,
                                                  mixes=mixes)) + "\n")
        print(f"wrote {len(mixes)} served steps to {args.out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("decode_mix_replay measure needs a CUDA GPU (the engine's decode step in CUDA graphs)", file=sys.stderr)
        return 2
    from real.profile import profile_runner

    src = json.loads(Path(args.mixes).read_text())
    mixes = src["mixes"]
    device = torch.device("cuda:0")
    need = max(sum(m["contexts"]) + 32 * len(m["contexts"]) for m in mixes)
    budget = max(POOL_TOKENS, need)  # the scattered form spreads the batch over this pool (~60 GB at 0.6b)
    runner = profile_runner(args.model, device, max(len(m["contexts"]) for m in mixes),
                            max(m["longest"] for m in mixes) + 64, budget)
    with torch.inference_mode():
        rows = measure(mixes, runner, args.reps)
    table = summary(rows)
    print(f"{'batch':>10} {'longest':>16} {'n':>2} {'real':>6} {'model':>6} {'beyond':>6} {'mtail':>6} {'served':>6} "
          f"{'scatt':>6} {'long1st':>7} {'unif':>6} {'rtail':>6}   (ms)")
    for r in table:
        print(f"{r['batch_bin']:>10} {r['longest_bin']:>16} {r['steps']:>2} {r['real_ms']:6.2f} {r['model_ms']:6.2f} "
              f"{r['beyond_served_ms']:6.2f} {r['model_tail_ms']:6.2f} {r['served_ms']:6.2f} {r['scattered_ms']:6.2f} "
              f"{r['longest_first_ms']:7.2f} {r['uniform_ms']:6.2f} {r['replay_tail_ms']:6.2f}")
    name = torch.cuda.get_device_name(device)
    out = results_path(args.out, "decode_mix_replay", name)
    write_results(out, dict(gpu=name, date=date.today().isoformat(), command=" ".join(sys.argv), mixes_from=src["run"],
                            profile=src["profile"], kv_blocks=int(runner.kv_cache.shape[2]), summary=table, rows=rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
