"""The simulator's decode tail against graph replays at batches between graph buckets (issue 6):

    python bench/tail_model_check.py bench/results/pipeline_tail_placed_*_NVIDIA_H200.json [--json OUT]

Each row of `bench/pipeline_diag.py --tail-only --tail-place P --tail-batches ...` gives a measured tail (mixed minus
uniform contexts at the same mean, sequential and per split); the model's (sim/cost_model.py microbatch_tail_s with
the profile's decode_tail_scale) is computed for the same contexts two ways: `new`, micro-batches as the engine's
pipelined graphs make them (halves of the batch padded to its bucket: 33 -> 24 + 9), and `old`, even halves of the
sequences (the model before session 19). Prints both errors per row and their mean |error|.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import date
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sim.cost_model import make_cost_model, unscaled_microbatch_tail_s  # noqa: E402
from traces.profile import default_profile_path, placed_tail_contexts  # noqa: E402

KEY = re.compile(r"tail_placed_(\w+?)_long(\d+)|tail_ab(?:_long(\d+))?")  # pipeline_diag.tail_ab's result keys


def even_halves_tail_s(cost, contexts: list[int], microbatches: int = 1) -> float:
    """unscaled_microbatch_tail_s as it was before session 19: even slices of the sequences, each kernel's grid its
    slice's own graph bucket (the counterfactual this script reads the engine's slicing against)."""
    n = len(contexts)
    m = max(1, min(microbatches, n))
    parts = (contexts[n * i // m: n * (i + 1) // m] for i in range(m))
    return sum(cost.decode_tail_s(len(p), sum(p) + len(p), max(p)) for p in parts)


def check(results: list[dict], cost) -> pd.DataFrame:
    """One row per (placement, long context, batch, sequential or split): measured and modelled tails, ms. The scale
    (decode_tail_scale) multiplies both forms alike: the profile's decode_tail rows sit at graph buckets, where the
    two slicings agree."""
    rows = []
    for d in results:
        for key, per in d.items():
            m = KEY.fullmatch(key)
            if not m:
                continue
            place, long = m.group(1) or "every8", int(m.group(2) or m.group(3) or 8192)
            for b, row in per["qwen3-0.6b"].items():
                b = int(b)
                contexts = placed_tail_contexts(b, long, place)
                excess = max(contexts) - sum(contexts) / b
                measured = {"seq": row["seq_mixed_ms"] - row["seq_uniform_ms"]}
                measured.update({k: v - row["pipe_uniform_ms"][k] for k, v in row["pipe_mixed_ms"].items()})
                for name, ms in measured.items():
                    split = None if name == "seq" else tuple(int(x) for x in name.split(":"))
                    mb = 1 if split is None else 2
                    scale = cost.decode_tail_scale(b, excess, split) * 1e3
                    rows.append((place, long, b, name, ms, even_halves_tail_s(cost, contexts, mb) * scale,
                                 unscaled_microbatch_tail_s(cost, contexts, mb) * scale))
    df = pd.DataFrame(rows, columns=["place", "long", "batch", "split", "measured_ms", "old_ms", "new_ms"])
    df["old_err"], df["new_err"] = df.old_ms - df.measured_ms, df.new_ms - df.measured_ms
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="pipeline_diag --tail-only JSONs")
    ap.add_argument("--profile", default=str(default_profile_path("h200x2", "qwen3-0.6b")))
    ap.add_argument("--json", default=None, help="write the rows and the mean |errors| here")
    args = ap.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in args.results]
    df = check(results, make_cost_model("h200x2", "qwen3-0.6b", kind="calibrated", profile=args.profile))
    pd.set_option("display.width", 200)
    print(df.round(3).to_string())
    print(df.groupby(["place", "split"])[["old_err", "new_err"]].apply(lambda g: g.abs().mean()).round(3))
    err = dict(old=round(df.old_err.abs().mean(), 4), new=round(df.new_err.abs().mean(), 4))
    print(f"mean |err| old {err['old']:.3f} new {err['new']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=str(date.today()), gpu=results[0]["gpu"], profile=args.profile, mean_abs_err_ms=err,
            command="python bench/tail_model_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            rows=df.round(4).to_dict(orient="records")), indent=1))
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
