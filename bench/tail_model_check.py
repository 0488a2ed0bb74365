"""The simulator's decode tail against graph replays at batches between graph buckets (issue 6):

    python bench/tail_model_check.py bench/results/pipeline_tail_placed_*_NVIDIA_H200.json [--json OUT]

Each row of `bench/pipeline_diag.py --tail-only --tail-place P --tail-batches ...` gives a measured tail (mixed minus
uniform contexts at the same mean, sequential and per split); the model's (sim/cost_model.py microbatch_tail_s with
the default profile's decode_tail_scale) is computed for the same contexts two ways: `new`, micro-batches as the
engine's pipelined graphs make them (halves of the batch padded to its bucket: 33 -> 24 + 9), and `old`, even
halves of the sequences (the model before session 19). Prints both errors per row and their mean |error|."""
import sys, json, re
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sim.cost_model as C
from sim.cost_model import make_cost_model
from traces.profile import tail_mix_contexts
new = C.unscaled_microbatch_tail_s
def old(cost, contexts, microbatches=1):
    n = len(contexts); m = max(1, min(microbatches, n)); total = 0.0
    for i in range(m):
        part = contexts[n * i // m: n * (i + 1) // m]
        total += cost.decode_tail_s(len(part), sum(part) + len(part), max(part))
    return total
prof = "traces/profiles/h200x2-qwen3-0.6b.csv"
costs = {}
for name, fn in (("old", old), ("new", new)):
    C.unscaled_microbatch_tail_s = fn
    costs[name] = (make_cost_model("h200x2", "qwen3-0.6b", kind="calibrated", profile=prof), fn)
def ctx_of(b, L, place):
    if place == "every8": return tail_mix_contexts(b, L)
    c = [1024] * b; c[0 if place == "first" else -1] = L; return c
rows = []
import argparse
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("results", nargs="+")
ap.add_argument("--json", default=None)
args = ap.parse_args()
for f in args.results:
    d = json.load(open(f))
    for key, per in d.items():
        m = re.fullmatch(r"tail_placed_(\w+?)_long(\d+)|tail_ab(?:_long(\d+))?", key)
        if not m: continue
        place = m.group(1) or "every8"; L = int(m.group(2) or m.group(3) or 8192)
        for b, row in per["qwen3-0.6b"].items():
            b = int(b); ctx = ctx_of(b, L, place)
            meas = {"seq": row["seq_mixed_ms"] - row["seq_uniform_ms"]}
            meas.update({k: v - row["pipe_uniform_ms"][k] for k, v in row["pipe_mixed_ms"].items()})
            for k, v in meas.items():
                split = None if k == "seq" else tuple(int(x) for x in k.split(":"))
                mm = 1 if split is None else 2
                out = {}
                for name, (cost, fn) in costs.items():
                    C.unscaled_microbatch_tail_s = fn
                    out[name] = C.microbatch_tail_s(cost, ctx, mm, split) * 1e3
                rows.append((place, L, b, k, v, out["old"], out["new"]))
import pandas as pd
df = pd.DataFrame(rows, columns=["place", "long", "batch", "split", "measured_ms", "old_ms", "new_ms"])
df["old_err"] = df.old_ms - df.measured_ms; df["new_err"] = df.new_ms - df.measured_ms
pd.set_option("display.width", 200)
print(df.round(3).to_string())
print(df.groupby(["place", "split"])[["old_err", "new_err"]].apply(lambda g: g.abs().mean()).round(3))
print("mean |err| old %.3f new %.3f ms" % (df.old_err.abs().mean(), df.new_err.abs().mean()))
if args.json:
    from datetime import date
    Path(args.json).write_text(json.dumps(dict(
        date=str(date.today()), gpu=json.load(open(args.results[0]))["gpu"], command="python bench/tail_model_check.py " + " ".join(sys.argv[1:]),
        profile=prof, mean_abs_err_ms=dict(old=round(df.old_err.abs().mean(), 4), new=round(df.new_err.abs().mean(), 4)),
        rows=df.round(4).to_dict(orient="records")), indent=1))
    print("wrote", args.json)
