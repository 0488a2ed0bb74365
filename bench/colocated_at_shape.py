"""A colocated (single) run's GPU0 steps against the cost model at their own shapes, mixed steps with their chunks'
cached prefixes put back (issue 6).

Why: on the held-out workload the simulator reads single's TTFT and TPOT means 10-13% high on every 2x H200 machine
with the default profile, where the real machines agree within 3-4%. Single is near saturation there, so a few % of
step cost turns into 10% of latency through the queue; this says which steps carry it. steps.csv does not say how a
mixed step's prefill tokens split between prompts or how much of each prompt was already cached, so they are
rebuilt from requests.csv the way the scheduler cuts chunks: the prompts prefilling during the step (prefill
started at or before it, ended at or after it), in prefill-start order, each taking what is left of its prompt
until the step's chunk tokens are used. A step whose tokens do not add up that way is left out (and counted).
Decode steps and mixed steps are modelled as bench/fidelity_diagnose.py's colocated_step_frame does (engine
overhead and decode tail included; real periods take the launch gap when the next step was queued).

    python bench/colocated_at_shape.py RUNS.tar.xz --profile A.csv [--profile B.csv ...] [--policy single] --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fidelity_bench as fb  # noqa: E402
import fidelity_diagnose as fd  # noqa: E402
from results_io import write_results  # noqa: E402

PREFIX_BINS = [-1, 0, 1024, 2048, 4096, 8192, 1 << 30]


def rebuild_chunks(steps: pd.DataFrame, requests: pd.DataFrame) -> list[list[tuple[int, int]] | None]:
    """Per GPU0 step in time order: a prefill or mixed step's (chunk tokens, cached prefix) per prompt, or None (a
    decode step, or a step whose tokens do not add up). Prefill steps count too: a prompt's first chunk may run in
    one with no decodes beside it."""
    reqs = requests.sort_values("prefill_start_s")
    done: dict[int, int] = {}
    out: list[list[tuple[int, int]] | None] = []
    for st in steps.itertuples():
        if st.stage not in ("mixed", "prefill"):
            out.append(None)
            continue
        active = reqs[(reqs.prefill_start_s <= st.t_start_s + 1e-7) & (reqs.prefill_end_s >= st.t_end_s - 1e-7)]
        decodes = int(st.batch_size) - len(active) if st.stage == "mixed" else 0
        left = int(st.tokens) - decodes  # a mixed step's tokens: the chunk tokens + one per decode
        chunks = []
        for q in active.itertuples():
            have = done.get(q.request_id, 0)
            c = min(int(q.prompt_tokens) - have, left)
            if c > 0:
                chunks.append((c, have))
                done[q.request_id] = have + c
                left -= c
        out.append(chunks if chunks and left == 0 else None)
    return out


def at_shape(run: Path, cost) -> pd.DataFrame:
    """fidelity_diagnose.colocated_step_frame's steps plus, for mixed ones, the model with the rebuilt chunks."""
    d = fd.colocated_step_frame(run, cost)
    steps = pd.read_csv(run / "steps.csv")
    g = steps[steps.device == "gpu0"].sort_values("t_start_s")
    rebuilt = rebuild_chunks(g, pd.read_csv(run / "requests.csv"))
    chunks = [c for c, stage in zip(rebuilt, g.stage) if stage in ("decode", "mixed")]  # d's rows, in d's order
    assert len(chunks) == len(d)
    with_prefix, prefix = [], []
    for ch, st, b, kv in zip(chunks, d.stage, d.decodes, d.kv):
        if st != "mixed" or ch is None:
            with_prefix.append(np.nan)
            prefix.append(np.nan)
            continue
        tokens = sum(c for c, _ in ch)
        dkv = int(kv) - sum(c + p for c, p in ch)
        over = max(cost.engine_overhead_s("prefill", 1, tokens, False, True),
                   cost.engine_overhead_s("decode", int(b), max(dkv, 0), False, True))
        with_prefix.append(cost.forward_s(ch, int(b), max(dkv, 0)) + over)
        prefix.append(sum(c * p for c, p in ch) / tokens)
    d["model_with_prefix"], d["prefix"] = with_prefix, prefix
    return d


def summary(d: pd.DataFrame) -> dict:
    dec, mix = d[d.stage == "decode"], d[d.stage == "mixed"]
    rebuilt = mix[mix.model_with_prefix.notna()]
    by_prefix = rebuilt.groupby(pd.cut(rebuilt.prefix, PREFIX_BINS), observed=True).agg(
        steps=("real", "size"), real_s=("real", "sum"), model_s=("model_with_prefix", "sum"))
    return dict(decode=dict(steps=len(dec), model_over_real=float(dec.model.sum() / dec.real.sum())),
                mixed=dict(steps=len(mix), model_over_real_prefix_as_decode_kv=float(mix.model.sum() / mix.real.sum()),
                           rebuilt=len(rebuilt),
                           model_over_real_with_prefix=float(rebuilt.model_with_prefix.sum() / rebuilt.real.sum())
                           if len(rebuilt) else None,
                           by_prefix={str(k): dict(steps=int(r.steps), model_over_real=round(r.model_s / r.real_s, 4))
                                      for k, r in by_prefix.iterrows()}))


def main(argv=None) -> int:
    from sim.cost_model import make_cost_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="the .tar.xz/.tgz of real runs (bench/fidelity_bench.py real)")
    ap.add_argument("--profile", action="append", required=True, help="a profile CSV (repeat to compare several)")
    ap.add_argument("--policy", default="single", help="the run folder to read (a colocated policy)")
    ap.add_argument("--hardware", default="h200x2")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not args.runs.is_file():
        print(f"error: {args.runs}: no such file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        runs = [d for d in fb.extract_runs(args.runs, Path(tmp)) if d.name == args.policy]
        if not runs:
            print(f"error: {args.runs}: no {args.policy} run in it", file=sys.stderr)
            return 2
        gpu = json.loads((runs[0] / "run.json").read_text()).get("hardware", {}).get("device")
        result = {}
        for prof in args.profile:
            cost = make_cost_model(args.hardware, args.model, kind="calibrated", profile=prof)
            result[prof] = summary(at_shape(runs[0], cost))
            s = result[prof]
            print(f"{prof}: decode {s['decode']['model_over_real']:.3f}, mixed {s['mixed']['model_over_real_prefix_as_decode_kv']:.3f}"
                  f" (prefix as decode KV) / {s['mixed']['model_over_real_with_prefix'] or float('nan'):.3f}"
                  f" (chunks rebuilt: {s['mixed']['rebuilt']} of {s['mixed']['steps']})")
    write_results(args.out, dict(gpu=gpu, date=date.today().isoformat(), runs=str(args.runs), policy=args.policy,
                                 command="python bench/colocated_at_shape.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                 note="model / real at the real steps' own shapes (no queueing feedback)", profiles=result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
