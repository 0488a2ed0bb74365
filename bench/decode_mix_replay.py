"""Replay served decode batches in the engine, alone (issue 6): is single's big-batch miss in the step itself?

    python bench/decode_mix_replay.py export RUN_DIR_OR_TGZ --profile PROFILE.csv --out MIXES.json   # CPU
    python bench/decode_mix_replay.py measure MIXES.json --out bench/results/decode_mix_replay_<gpu>.json  # 1 GPU

In session 15's single runs (2x H200), GPU0 decode steps of 129-256 sequences with one sequence past ~4,000
tokens took 4-5 ms more than the sim's model of them (the step at the batch's mean context + the decode tail of
its longest sequence), where steps of <= 128 sequences with the same long sequence, and steps of 129-256 with
none past 2,500 tokens, were within 0.3 ms (bench/fidelity_diagnose.py colocated_beyond_model). The jump sits
between 128 and 129 sequences. bench/decode_tail_order.py found no such jump in the paged-decode kernel on
uniform 1,024-token batches with one long sequence, wherever it sat in the grid.

`export --gpu1` does the same for GPU1's decode steps of a pd, pipeline or adaptive run (pipelined ones on their split
by default): each with the sim's charge in parts (isolated step, tail, engine overhead; fidelity_diagnose.
gpu1_step_frame), and `measure` replays them on the split they ran on (green contexts, the pipelined graphs). Why:
session 24's pipeline conv steps of 129-256 sequences (2x H200) were modelled 0.97-0.98x after the decode_tail rows
at 192/256 and the 224 knot; the replay says whether what is left is the step's shape (served replay over the
model's isolated + tail) or the serving (the real period over the replay, against the modelled overhead).

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
GPU1_BATCH_BINS = ((64, 128), (128, 160), (160, 192), (192, 224), (224, 256))  # pipeline's conv steps: 64-225
LONGEST_BINS = ((0, 2500), (4000, 1 << 20))  # (lo, hi] the longest decoding context, tokens
POOL_TOKENS = 1 << 19  # the KV pool replayed into: the profile's token budget
FORMS = ("served", "scattered", "longest_first", "uniform")


def _run_dir(path: Path, policy: str = "single") -> Path:
    """A run folder, or the `policy` run of a fidelity_bench archive (extracted to a temporary folder)."""
    from fidelity_bench import extract_runs

    if path.is_dir():
        return path
    for run in extract_runs(path, Path(tempfile.mkdtemp(prefix="mix-replay-"))):
        if json.loads((run / "run.json").read_text()).get("policy") == policy:
            return run
    raise SystemExit(f"{path}: no {policy} run in the archive")


def export_gpu1_mixes(run: Path, cost, per_bin: int = 5, pipelined: bool = True, seed: int = 0) -> list[dict]:
    """Up to `per_bin` GPU1 decode steps (pipelined ones, or sequential ones with pipelined=False) of each
    (decode batch, longest context) bin of GPU1_BATCH_BINS, at random, one-step rows only: their contexts (join
    order, as many as the step's batch), split, real period and the sim's charge in parts (ms)."""
    import numpy as np

    from fidelity_diagnose import gpu1_step_frame

    from sim.cost_model import microbatch_tail_s

    frame = gpu1_step_frame(run, cost)
    frame = frame[(frame.num_steps == 1) & ((frame.attn_sms > 0) == pipelined)]
    frame = frame[[len(c) == b for c, b in zip(frame.contexts, frame.b)]]  # the reconstruction found the batch
    frame = frame.assign(longest=[float(c.max()) for c in frame.contexts])
    rng = np.random.default_rng(seed)
    mixes = []
    for lo, hi in GPU1_BATCH_BINS:
        for clo, chi in LONGEST_BINS:
            pick = frame[(frame.b > lo) & (frame.b <= hi) & (frame.longest > clo) & (frame.longest <= chi)]
            for i in sorted(rng.choice(pick.index, size=min(per_bin, len(pick)), replace=False)):
                r = frame.loc[i]
                ms = {k: round(float(r[k]) * 1e3, 4) for k in ("real", "iso_s", "tail_s", "overhead_s", "copy_s", "model")}
                mixes.append(dict(t_start_s=round(float(r.t), 6), decodes=int(r.b), kv_tokens=int(r.kv),
                                  longest=int(r.longest), mean_context=round(float(r.contexts.mean()), 1),
                                  attn_sms=int(r.attn_sms), ffn_sms=int(r.ffn_sms), real_ms=ms["real"],
                                  model_ms=ms["model"], model_iso_ms=ms["iso_s"], model_tail_ms=ms["tail_s"],
                                  model_overhead_ms=round(ms["overhead_s"] + ms["copy_s"], 4),
                                  model_seq_tail_ms=round(microbatch_tail_s(cost, [int(c) - 1 for c in r.contexts])
                                                          * 1e3, 4),
                                  contexts=[int(round(c)) for c in r.contexts]))
    return mixes


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
    real.profile.median_s, as the profile's decode rows); a mix with attn_sms > 0 pipelined on its split in
    2 micro-batches (the runner's pipeline enabled on those splits)."""
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
        split = ((mix["attn_sms"], mix["ffn_sms"]), 2) if mix.get("attn_sms") else ()
        runs = [(form, lens, split) for form, lens in forms.items()]
        if split:  # the same contexts sequential too: the pipelined tail over the sequential one, in one process
            runs += [("seq_served", ctx, ()), ("seq_uniform", forms["uniform"], ())]
        for form, lens, extra in runs:
            batch = fake_decode_batch(runner, n, lens)
            if form == "scattered":
                scatter_blocks(batch, num_blocks, seed=k)
            row[f"{form}_s"] = time_fn(lambda: runner.run(batch, {}, *extra), device, reps)
        out.append(row)
    return out


def summary(rows: list[dict], bins=BATCH_BINS) -> list[dict]:
    """Per (decode batch bin, longest bin): medians in ms of the served steps' real period and excess over the
    model, the model's tail, and the replay's forms and measured tail (served - uniform). GPU1 mixes (with
    model_iso_ms) also: `shape_model_over_replay`, the model's isolated step + tail over the served replay (the
    step's shape), and `serving_ms`, the real period - the served replay, beside the modelled overhead."""
    import pandas as pd

    d = pd.DataFrame(rows)
    for f in FORMS:
        d[f"{f}_ms"] = d[f"{f}_s"] * 1e3
    d["beyond_served_ms"] = d.real_ms - d.model_ms
    d["replay_tail_ms"] = d.served_ms - d.uniform_ms
    d["batch_bin"] = pd.cut(d.decodes, pd.IntervalIndex.from_tuples(list(bins))).astype(str)
    d["longest_bin"] = pd.cut(d.longest, [0, 2500, 4000, 1 << 20]).astype(str)
    cols = ["real_ms", "model_ms", "beyond_served_ms", "model_tail_ms", "served_ms", "scattered_ms",
            "longest_first_ms", "uniform_ms", "replay_tail_ms"]
    if "model_iso_ms" in d:
        d["shape_model_over_replay"] = (d.model_iso_ms + d.model_tail_ms) / d.served_ms
        d["serving_ms"] = d.real_ms - d.served_ms
        cols += ["model_iso_ms", "shape_model_over_replay", "serving_ms", "model_overhead_ms"]
    if "seq_served_s" in d:  # the pipelined tail over the sequential one: replayed, and as the sim scales it
        d["seq_replay_tail_ms"] = (d.seq_served_s - d.seq_uniform_s) * 1e3
        d["replay_pipe_over_seq_tail"] = d.replay_tail_ms / d.seq_replay_tail_ms
        d["model_pipe_over_seq_tail"] = d.model_tail_ms / d.model_seq_tail_ms
        cols += ["model_seq_tail_ms", "seq_replay_tail_ms", "replay_pipe_over_seq_tail", "model_pipe_over_seq_tail"]
    agg = d.groupby(["batch_bin", "longest_bin"], observed=True)[cols].median().round(3)
    agg.insert(0, "steps", d.groupby(["batch_bin", "longest_bin"], observed=True).size())
    return [dict(batch_bin=b, longest_bin=lb, **r.to_dict()) for (b, lb), r in agg.iterrows()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="pick served steps from a real run (CPU)")
    ex.add_argument("run", help="a real run folder, or a fidelity_bench archive (its --policy run)")
    ex.add_argument("--gpu1", action="store_true",
                    help="GPU1's decode steps (pd, pipeline, adaptive) instead of GPU0's (single)")
    ex.add_argument("--sequential", action="store_true", help="with --gpu1: its sequential steps, not pipelined ones")
    ex.add_argument("--policy", default=None, help="the archive's run to read (default: pipeline with --gpu1, "
                                                    "else single)")
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

        if args.sequential and not args.gpu1:
            ap.error("--sequential reads GPU1's steps: add --gpu1")
        run = _run_dir(Path(args.run), args.policy or ("pipeline" if args.gpu1 else "single"))
        info = json.loads((run / "run.json").read_text())
        hardware = "h200x2" if "H200" in info["hardware"]["device"] else "h100x2"
        cost = make_cost_model(hardware, args.model, kind="calibrated", profile=args.profile)
        mixes = (export_gpu1_mixes(run, cost, args.per_bin, pipelined=not args.sequential) if args.gpu1
                 else export_mixes(run, cost, args.per_bin))
        Path(args.out).write_text(json.dumps(dict(run=str(args.run), profile=args.profile, hardware=hardware,
                                                  device="gpu1" if args.gpu1 else "gpu0", mixes=mixes)) + "\n")
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
    # room up to the graph bucket of the biggest batch: a runner capped below it replays that batch eagerly (session
    # 26's first GPU1 replay read its 225-sequence steps at 66-73 ms, its 97-100-sequence pd steps at 25-35)
    from real.graphs import GRAPH_BUCKETS

    most = max(len(m["contexts"]) for m in mixes)
    runner = profile_runner(args.model, device, next((b for b in GRAPH_BUCKETS if b >= most), most),
                            max(m["longest"] for m in mixes) + 64, budget)
    splits = sorted({(m["attn_sms"], m["ffn_sms"]) for m in mixes if m.get("attn_sms")})
    if splits:  # GPU1's pipelined steps: on the splits they ran on, in the engine's pipelined graphs
        from real.green import SmPartitions

        with torch.inference_mode(), torch.cuda.device(device):
            runner.enable_pipeline(SmPartitions(device, splits), splits, 2)
    with torch.inference_mode(), torch.cuda.device(device):
        rows = measure(mixes, runner, args.reps)
    gpu1 = src.get("device") == "gpu1"
    table = summary(rows, GPU1_BATCH_BINS if gpu1 else BATCH_BINS)
    print(f"{'batch':>10} {'longest':>16} {'n':>2} {'real':>6} {'model':>6} {'beyond':>6} {'mtail':>6} {'served':>6} "
          f"{'scatt':>6} {'long1st':>7} {'unif':>6} {'rtail':>6}   (ms)")
    for r in table:
        print(f"{r['batch_bin']:>10} {r['longest_bin']:>16} {r['steps']:>2} {r['real_ms']:6.2f} {r['model_ms']:6.2f} "
              f"{r['beyond_served_ms']:6.2f} {r['model_tail_ms']:6.2f} {r['served_ms']:6.2f} {r['scattered_ms']:6.2f} "
              f"{r['longest_first_ms']:7.2f} {r['uniform_ms']:6.2f} {r['replay_tail_ms']:6.2f}"
              + (f"  iso {r['model_iso_ms']:6.2f} shape model/replay {r['shape_model_over_replay']:.3f} serving "
                 f"{r['serving_ms']:5.2f} (model {r['model_overhead_ms']:5.2f})" if gpu1 else "")
              + (f"  pipelined/sequential tail: replay {r['replay_pipe_over_seq_tail']:.2f} model "
                 f"{r['model_pipe_over_seq_tail']:.2f}" if "replay_pipe_over_seq_tail" in r else ""))
    name = torch.cuda.get_device_name(device)
    out = results_path(args.out, "decode_mix_replay", name)
    write_results(out, dict(gpu=name, date=date.today().isoformat(), command=" ".join(sys.argv), mixes_from=src["run"],
                            profile=src["profile"], kv_blocks=int(runner.kv_cache.shape[2]), summary=table, rows=rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
