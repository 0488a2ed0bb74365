"""Where the GPU1 pipelined decode step loses (issue 5), on one GPU, in one call.

Per model shape and decode batch B (1024-token contexts), everything in CUDA graphs with the engine's fused kernels:
  step    the sequential decode step at B, and the pipelined step (2 micro-batches of B/2) at each split under
          each kernel-sizing variant (real.pipeline.PartitionKernels): the engine's (sized for the whole GPU);
          decode-attention splits sized for the partition; + the cuBLAS(Lt) SM carveout; + cuBLASLt preferred.
          The summary reads the engine's variant (the results of 2026-11-27 read partition_sized, then first).
  layer   one decoder layer: sequential at B and at B/2, and per split the like-for-like pair, attention of one
          B/2 micro-batch on the attention partition || FFN of another on the FFN partition. Two pairs are one
          layer of an ideal 2-micro-batch pipeline, so its ceiling is seq_layer(B) / (2 pair(B/2)); the
          facts-file ceiling, pair and sequential both at B, is seq_layer(B) / pair(B).
  trace   torch.profiler kernel timelines of one replay of the sequential step and of the best pipelined step:
          busy time per stream, the time both partitions are busy, kernel time by kind.
    python bench/pipeline_diag.py --out bench/results/pipeline_diag_<gpu>.json
--tail-only: what mixed contexts add to the sequential and pipelined step per split (tail_ab); with --tail-batches
between graph buckets and --tail-place first|last, where one long sequence lands once a pipelined graph halves the
padded batch (read with bench/tail_model_check.py);
--to-profile JSON OUT.csv (CPU): its results as decode_tail profile rows, for `python -m traces.profile extend`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from traces.profile import placed_tail_contexts, tail_mix_contexts  # noqa: E402  (the mixed contexts here and in the decode_tail rows)

VARIANTS = {  # name: (attention_splits, gemm_carveout, BLAS library); the first is the engine's default
    "gpu_sized": (False, False, None),
    "partition_sized": (True, False, None),
    "partition_sized+carveout": (True, True, None),
    "partition_sized+carveout+lt": (True, True, "cublaslt"),
}
ENGINE = next(iter(VARIANTS))
BATCHES = {"qwen3-0.6b": (64, 256, 512), "qwen3-8b": (16, 64, 256)}


def replay_ms(graph, reps: int = 20) -> float:
    """Mean GPU time of back-to-back replays (CUDA events), after 3 untimed ones."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def graph_of(fn, inner: int = 8):
    """`inner` back-to-back calls of fn captured as one graph, with the fused kernels (or None on failure)."""
    from real.graphs import compiled_fusions

    stream = torch.cuda.Stream()
    with compiled_fusions():
        try:
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(inner):
                    fn()
        except RuntimeError as e:
            print(f"  capture failed: {str(e).splitlines()[0]}", flush=True)
            torch.cuda.synchronize()
            return None
    return graph


def layer_ms(fn, inner: int = 8) -> float | None:
    graph = graph_of(fn, inner)
    return None if graph is None else replay_ms(graph, 10) / inner


BLAS_DEFAULT: list = []  # the process's BLAS library before any variant


def set_variant(name: str) -> None:
    from real.pipeline import PartitionKernels

    if not BLAS_DEFAULT:
        BLAS_DEFAULT.append(torch.backends.cuda.preferred_blas_library())
    splits, carveout, blas = VARIANTS[name]
    PartitionKernels.attention_splits, PartitionKernels.gemm_carveout = splits, carveout
    torch.backends.cuda.preferred_blas_library(blas or BLAS_DEFAULT[0])


def layer_fns(lb, a_s, f_s, split):
    """attention alone on its partition, FFN alone on its, and the two concurrently (independent inputs)."""
    from real.pipeline import on_partition

    total = sum(split)

    def alone(stream, sms, fn):
        def run():
            start = torch.cuda.Event()
            start.record()
            stream.wait_event(start)
            with on_partition(stream, sms, total):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
        return run

    def pair():
        start = torch.cuda.Event()
        start.record()
        a_s.wait_event(start)
        f_s.wait_event(start)
        with on_partition(a_s, split[0], total):
            lb.attn()
        with on_partition(f_s, split[1], total):
            lb.ffn()
        torch.cuda.current_stream().wait_stream(a_s)
        torch.cuda.current_stream().wait_stream(f_s)

    return alone(a_s, split[0], lb.attn), alone(f_s, split[1], lb.ffn), pair


def kind_of(name: str) -> str:
    n = name.lower()
    if "paged_decode" in n or "decode_kernel" in n or "attn" in n:
        return "attention"
    if any(k in n for k in ("gemm", "gemv", "nvjet", "cutlass", "sm90", "matmul", "splitk", "cublas")):
        return "gemm"
    return "other"


def timeline(graph) -> dict:
    """Kernel timeline of one replay: span, busy time per stream, overlap, kernel time by kind."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return dict(kernels=0)
    t0 = min(e["ts"] for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - t0

    def union(evs):
        total, end = 0.0, -1e18
        for s, d in sorted((e["ts"], e["dur"]) for e in evs):
            if s + d > end:
                total += s + d - max(s, end)
                end = s + d
        return total

    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))), []).append(e)
    busy = {s: union(evs) / 1e3 for s, evs in by_stream.items()}
    kinds: dict = {}
    for e in kernels:
        k = kind_of(e["name"])
        kinds.setdefault(k, [0, 0.0])
        kinds[k][0] += 1
        kinds[k][1] += e["dur"] / 1e3
    first = sorted(kernels, key=lambda e: e["ts"])[:40]
    return dict(kernels=len(kernels), span_ms=span / 1e3, busy_ms_by_stream=busy,
                busy_union_ms=union(kernels) / 1e3, overlap_ms=sum(busy.values()) - union(kernels) / 1e3,
                kernel_ms_by_kind={k: dict(count=c, ms=ms) for k, (c, ms) in kinds.items()},
                first_kernels=[dict(name=e["name"][:80], stream=e.get("args", {}).get("stream"),
                                    grid=e.get("args", {}).get("grid"), start_us=round(e["ts"] - t0, 1),
                                    dur_us=round(e["dur"], 1)) for e in first])


def gemm_carveout_check(device, partitions, split, hidden: int, inter: int, rows: int) -> dict:
    """An FFN-shaped GEMM on the FFN partition, plain vs with the carveout (and cuBLASLt): does the knob act?"""
    from real.pipeline import PartitionKernels, on_partition

    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(2 * inter, hidden, device=device, dtype=torch.bfloat16)
    _, f_s = partitions.get(split)
    out = {}
    for name in VARIANTS:
        set_variant(name)

        def fn():
            start = torch.cuda.Event()
            start.record()
            f_s.wait_event(start)
            with on_partition(f_s, split[1], sum(split)):
                torch.nn.functional.linear(x, w)
            torch.cuda.current_stream().wait_stream(f_s)

        t = layer_ms(fn)
        out[name] = t
        PartitionKernels.gemm_carveout = False
    set_variant(ENGINE)
    return out


def make_runner(model: str, device: torch.device, max_batch: int, max_len: int = 2048, kv_tokens: int = 0):
    """The engine's ModelRunner with a KV cache just big enough for max_batch x 1024-token contexts (or
    kv_tokens; every fake batch starts at block 0), decode graphs per bucket and no prefill graphs (none are
    timed)."""
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model_config import ModelConfig
    from real.runner import ModelRunner

    blocks = (kv_tokens // 16 + max_batch if kv_tokens else max_batch * (1024 // 16 + 1)) + 64
    cfg = EngineConfig(model=model, device=device.type, seed=0, max_num_seqs=max_batch, max_model_len=max_len,
                       num_kv_blocks=blocks, prefill_graphs=False)
    with torch.inference_mode():
        return ModelRunner(cfg, ModelConfig.from_spec(model_spec(model)), device, None)


def diagnose(model: str, batches: tuple[int, ...], split_step: int, results: dict) -> None:
    from real.engine import hardware_of
    from real.green import SmPartitions
    from real.profile import LayerBench
    from real.testing import fake_decode_batch

    device = torch.device("cuda:0")
    runner = make_runner(model, device, max(batches))
    hw = hardware_of(device, 2, split_step)
    splits = hw.allowed_splits()
    parts = SmPartitions(device, splits)
    graphs = runner.graphs
    out = results.setdefault(model, {})
    mc = runner.model_cfg
    out["gemm_carveout_check"] = {f"{r} rows": gemm_carveout_check(device, parts, (96, hw.sms - 96), mc.hidden_size,
                                                                   mc.intermediate_size, r) for r in (32, 256)}
    print(f"{model}: FFN gate_up GEMM on 36 SMs by variant {out['gemm_carveout_check']}", flush=True)
    with torch.inference_mode():
        for b in batches:
            row = out.setdefault(str(b), {})
            batch = fake_decode_batch(runner, b, 1024)
            ids, pos, slots, lens, table = runner.prepare_decode(batch.decode)
            graphs.run(ids, pos, slots, lens, table)  # stages the inputs every graph of this bucket reads
            bucket = graphs.bucket(b)
            row["seq_step_ms"] = replay_ms(graphs.graphs[bucket])
            row["pipeline_step_ms"] = {}
            best = None
            for variant in VARIANTS:
                set_variant(variant)
                graphs.pipeline_graphs = {}
                graphs.capture_pipeline(parts, splits, 2, buckets=[bucket])
                times = {f"{s[0]}:{s[1]}": replay_ms(graphs.pipeline_graphs[(s, bucket)]) for s in splits}
                row["pipeline_step_ms"][variant] = times
                split = min(times, key=times.get)
                print(f"{model} batch {b}: seq {row['seq_step_ms']:.3f} ms, pipeline [{variant}] best {split} "
                      f"{times[split]:.3f} ms (x{row['seq_step_ms'] / times[split]:.3f})", flush=True)
                if best is None or times[split] < best[0]:
                    best = (times[split], variant, split)
            row["best_pipeline"] = dict(ms=best[0], variant=best[1], split=best[2],
                                        speedup=row["seq_step_ms"] / best[0])
            # the kernel timelines: sequential, and the best pipelined step under its variant
            set_variant(best[1])
            graphs.pipeline_graphs = {}
            graphs.capture_pipeline(parts, splits, 2, buckets=[bucket])
            best_split = tuple(int(x) for x in best[2].split(":"))
            row["trace_seq"] = timeline(graphs.graphs[bucket])
            row["trace_pipeline"] = timeline(graphs.pipeline_graphs[(best_split, bucket)])
            graphs.pipeline_graphs = {}
            # one layer: the like-for-like ceiling and the facts-file one, under default and the best variant
            lb_full, lb_half = LayerBench(runner, b, 1024), LayerBench(runner, b // 2, 1024)
            row["layer"] = {"seq_ms": layer_ms(lb_full.seq), "seq_half_ms": layer_ms(lb_half.seq)}
            for variant in dict.fromkeys((ENGINE, best[1])):
                set_variant(variant)
                per = {}
                for s in splits:
                    a_s, f_s = parts.get(s)
                    attn, ffn, pair = layer_fns(lb_half, a_s, f_s, s)
                    per[f"{s[0]}:{s[1]}"] = dict(attn_half_ms=layer_ms(attn), ffn_half_ms=layer_ms(ffn),
                                                 pair_half_ms=layer_ms(pair),
                                                 pair_full_ms=layer_ms(layer_fns(lb_full, a_s, f_s, s)[2]))
                row["layer"][variant] = per
                lay = row["layer"]
                pairs = {k: v["pair_half_ms"] for k, v in per.items() if v["pair_half_ms"]}
                fulls = {k: v["pair_full_ms"] for k, v in per.items() if v["pair_full_ms"]}
                if lay["seq_ms"] and pairs:
                    k = min(pairs, key=pairs.get)
                    lay[f"ceiling_like_for_like[{variant}]"] = dict(split=k, speedup=lay["seq_ms"] / (2 * pairs[k]))
                if lay["seq_ms"] and fulls:
                    k = min(fulls, key=fulls.get)
                    lay[f"ceiling_facts_file[{variant}]"] = dict(split=k, speedup=lay["seq_ms"] / fulls[k])
            set_variant(ENGINE)
            row["summary"] = summarize(row)
            print(f"{model} batch {b}: layer seq {row['layer']['seq_ms']:.4f} ms, "
                  f"{ {k: v for k, v in row['layer'].items() if k.startswith('ceiling')} }", flush=True)
            tp, ts = row["trace_pipeline"], row["trace_seq"]
            print(f"  trace: seq span {ts.get('span_ms')} ms kinds {ts.get('kernel_ms_by_kind')}; pipeline span "
                  f"{tp.get('span_ms')} ms busy {tp.get('busy_ms_by_stream')} overlap {tp.get('overlap_ms')} "
                  f"kinds {tp.get('kernel_ms_by_kind')}", flush=True)
    runner.close()
    del runner
    torch.cuda.empty_cache()


def summarize(row: dict) -> dict:
    """The engine's pipelined step against the sequential one and against the two ceilings (one point).
    speedup = seq step / best pipelined step; ceiling_like_for_like = seq layer(B) / (2 x best pair(B/2)), the
    ideal 2-micro-batch pipeline; ceiling_facts_file = seq layer(B) / best pair(B); captured_* = the share of a
    ceiling's gain the step realises, (speedup - 1) / (ceiling - 1), defined where the ceiling exceeds 1.01;
    pipeline_over_ideal = speedup / ceiling_like_for_like (1: the step is as fast as the ideal pipeline)."""
    times = row["pipeline_step_ms"][ENGINE]
    split = min(times, key=times.get)
    lay = row["layer"]
    out = dict(seq_step_ms=row["seq_step_ms"], best_split=split, pipeline_step_ms=times[split],
               speedup=row["seq_step_ms"] / times[split], layer_seq_ms=lay["seq_ms"])
    for name, key in (("like_for_like", "pair_half_ms"), ("facts_file", "pair_full_ms")):
        pairs = {k: v[key] for k, v in lay[ENGINE].items() if v.get(key)}
        if not pairs or not lay["seq_ms"]:
            continue
        k = min(pairs, key=pairs.get)
        ceiling = lay["seq_ms"] / ((2 if name == "like_for_like" else 1) * pairs[k])
        out[f"ceiling_{name}"], out[f"ceiling_{name}_split"] = ceiling, k
        if ceiling > 1.01:
            out[f"captured_{name}"] = (out["speedup"] - 1) / (ceiling - 1)
    if "ceiling_like_for_like" in out:
        out["pipeline_over_ideal"] = out["speedup"] / out["ceiling_like_for_like"]
    return out


def mixed_runner(model: str, batches: tuple[int, ...], splits, long: int = 8192):
    """(runner, its graphs, SM partitions for `splits`) on cuda:0, with a KV cache for the largest batch of
    tail_mix_contexts (every 8th sequence `long` tokens, the rest 1,024): mixed_ab's and tail_ab's set-up."""
    from real.graphs import GRAPH_BUCKETS
    from real.green import SmPartitions

    device = torch.device("cuda:0")
    kv = max(sum(tail_mix_contexts(b, long)) + long for b in batches)  # room for placed_tail_contexts too
    top = next((g for g in GRAPH_BUCKETS if g >= max(batches)), max(batches))  # the graph a batch of 100 runs in: 128
    runner = make_runner(model, device, top, max_len=max(long, 8192) + 64, kv_tokens=kv)
    return runner, runner.graphs, SmPartitions(device, list(splits))


def mixed_ab(model: str, batches: tuple[int, ...], results: dict, splits=((64, 68), (96, 36))) -> None:
    """The decode tail's side of PartitionKernels.attention_splits: the sequential and the pipelined step on
    mixed contexts (tail_mix_contexts at 8,192 tokens), with the decode kernel's context splits sized for the
    whole GPU and for the attention partition. Fewer splits make a long sequence stream more of its context alone."""
    from real.testing import fake_decode_batch

    runner, graphs, parts = mixed_runner(model, batches, splits)
    out = results.setdefault("mixed_contexts", {}).setdefault(model, {})
    with torch.inference_mode():
        for b in batches:
            batch = fake_decode_batch(runner, b, tail_mix_contexts(b))
            graphs.run(*runner.prepare_decode(batch.decode))
            bucket = graphs.bucket(b)
            row = out.setdefault(str(b), dict(contexts=f"{b - b // 8} x 1024 + {b // 8} x 8192",
                                              seq_step_ms=replay_ms(graphs.graphs[bucket])))
            for variant in ("gpu_sized", "partition_sized"):
                set_variant(variant)
                graphs.pipeline_graphs = {}
                graphs.capture_pipeline(parts, list(splits), 2, buckets=[bucket])
                row[variant] = {f"{a}:{f}": replay_ms(graphs.pipeline_graphs[((a, f), bucket)]) for a, f in splits}
            set_variant(ENGINE)
            graphs.pipeline_graphs = {}
            print(f"{model} batch {b} mixed contexts: seq {row['seq_step_ms']:.3f} ms, pipelined "
                  f"gpu-sized {row['gpu_sized']}, partition-sized {row['partition_sized']}", flush=True)
    runner.close()
    torch.cuda.empty_cache()


def tail_ab(model: str, batches: tuple[int, ...], results: dict,
            splits=((32, 100), (64, 68), (96, 36)), long: int = 8192, place: str = "every8") -> None:
    """What mixed contexts add to the sequential and to the pipelined step, split by split: each batch decoded
    once with uniform contexts and once with placed_tail_contexts at the same mean (the same KV read), in the engine's
    CUDA graphs (kernels as the engine sizes them). Why: the simulator adds the decode tail (sim/calibrated.py
    decode_tail_s, per micro-batch: sim/cost_model.py microbatch_tail_s) to the pipelined step as to the
    sequential one; on the held-out workload adaptive's 96:36 steps with a long sequence ran ~10% over the
    model where its 64:68 ones did not, and its duels there lost by 6-18% where the sim had them near a tie."""
    from real.testing import fake_decode_batch

    runner, graphs, parts = mixed_runner(model, batches, splits, long)
    set_variant(ENGINE)
    key = "tail_ab" if long == 8192 else f"tail_ab_long{long}"  # the first results (8,192) kept their key
    if place != "every8":
        key = f"tail_placed_{place}_long{long}"  # not decode_tail rows (tail_profile skips them)
    out = results.setdefault(key, {}).setdefault(model, {})
    with torch.inference_mode():
        for b in batches:
            mixed = placed_tail_contexts(b, long, place)
            mean = round(sum(mixed) / b)
            bucket = graphs.bucket(b)
            graphs.pipeline_graphs = {}
            graphs.capture_pipeline(parts, list(splits), 2, buckets=[bucket])
            longs = sum(c == long for c in mixed)
            row = out.setdefault(str(b), dict(bucket=bucket, mixed=f"{b - longs} x 1024 + {longs} x {long} ({place})",
                                              uniform=f"{b} x {mean}"))
            for name, contexts in (("uniform", [mean] * b), ("mixed", mixed)):
                batch = fake_decode_batch(runner, b, contexts)
                graphs.run(*runner.prepare_decode(batch.decode))  # the inputs into the graphs' static buffers
                row[f"seq_{name}_ms"] = replay_ms(graphs.graphs[bucket])
                row[f"pipe_{name}_ms"] = {f"{a}:{f}": replay_ms(graphs.pipeline_graphs[((a, f), bucket)])
                                          for a, f in splits}
            graphs.pipeline_graphs = {}
            print(f"{model} long {long} batch {b}: seq {row['seq_uniform_ms']:.3f} -> {row['seq_mixed_ms']:.3f} ms; "
                  "pipelined "
                  + ", ".join(f"{k} {row['pipe_uniform_ms'][k]:.3f} -> {row['pipe_mixed_ms'][k]:.3f}"
                              for k in row["pipe_uniform_ms"]), flush=True)
    runner.close()
    torch.cuda.empty_cache()


def tail_profile(results: dict, model: str = "qwen3-0.6b") -> tuple[list[dict], dict]:
    """(rows, metadata) of a profile holding tail_ab's results as decode_tail rows (mixed minus uniform step,
    sequential and per split, each --tail-long pass at its long context), to graft onto
    a profile that lacks them. The times are graph replays, without the whole step's input staging, which the
    same batch's two context mixes share."""
    from policies.specs import hardware_spec
    from real.profile import hardware_preset

    hardware = hardware_preset(results["gpu"])
    rows = []
    for key in (k for k in results if re.fullmatch(r"tail_ab(_long\d+)?", k)):
        long = int(key.removeprefix("tail_ab").removeprefix("_long") or 8192)
        for b, row in results[key][model].items():
            b = int(b)
            rows.append(dict(op="decode_tail", batch=b, tokens=b, context=long, attn_sms=0, ffn_sms=0, microbatches=1,
                             seconds=(row["seq_mixed_ms"] - row["seq_uniform_ms"]) / 1e3))
            for split, ms in row["pipe_mixed_ms"].items():
                a, f = (int(x) for x in split.split(":"))
                rows.append(dict(op="decode_tail", batch=b, tokens=b, context=long, attn_sms=a, ffn_sms=f,
                                 microbatches=2, seconds=(ms - row["pipe_uniform_ms"][split]) / 1e3))
    meta = dict(gpu=results["gpu"], date=results["date"], model=model, hardware=hardware, torch=results["torch"],
                sms=hardware_spec(hardware).sms, command=results["command"] + " ; then --to-profile",
                note="decode_tail rows from bench/pipeline_diag.py --tail-only (CUDA graph replays)")
    return rows, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(BATCHES))
    ap.add_argument("--split-step", type=int, default=16, help="splits in steps of this many SMs")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    ap.add_argument("--mixed-only", action="store_true",
                    help="only the mixed-context A/B of the decode kernel's context splits (batch 16, 32, 64)")
    ap.add_argument("--tail-only", action="store_true",
                    help="only what mixed contexts add to the sequential and the pipelined step (batch 8-128)")
    ap.add_argument("--tail-long", nargs="+", type=int, default=[8192],
                    help="--tail-only: the long sequences' context (every 8th; the rest 1,024), one pass each")
    ap.add_argument("--tail-batches", nargs="+", type=int, default=[8, 16, 32, 64, 128],
                    help="--tail-only: the batch sizes (between graph buckets too: a pipelined graph halves the padded batch)")
    ap.add_argument("--tail-place", choices=("every8", "first", "last"), default="every8",
                    help="--tail-only: every 8th sequence long (the decode_tail rows' mix), or one long one first or last")
    ap.add_argument("--to-profile", nargs=2, metavar=("JSON", "OUT_CSV"), default=None,
                    help="write a --tail-only JSON's results as decode_tail profile rows (CPU; no GPU run)")
    args = ap.parse_args(argv)
    if args.to_profile:
        from traces.profile import write_profile

        rows, meta = tail_profile(json.loads(Path(args.to_profile[0]).read_text()))
        print(f"wrote {write_profile(args.to_profile[1], rows, meta)} ({len(rows)} decode_tail rows)")
        return 0
    if not torch.cuda.is_available():
        print("pipeline_diag needs a CUDA GPU with green contexts", file=sys.stderr)
        return 2
    results = dict(gpu=torch.cuda.get_device_name(0), date=str(date.today()),
                   command="python bench/pipeline_diag.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   torch=torch.__version__,
                   context="mixed (tail_mix_contexts)" if args.mixed_only or args.tail_only else 1024)
    for model in args.models:
        try:
            if args.tail_only:
                for long in args.tail_long:
                    tail_ab(model, tuple(args.tail_batches), results, long=long, place=args.tail_place)
            elif args.mixed_only:
                mixed_ab(model, (16, 32, 64), results)
            else:
                diagnose(model, BATCHES.get(model, (64, 256)), args.split_step, results)
        except Exception as e:  # keep the other model's numbers
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[model] = f"{type(e).__name__}: {e}"
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
