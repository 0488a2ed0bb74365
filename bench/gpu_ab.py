"""Do the two GPUs of one node run the same step at the same speed, and does a fresh process? (issue 6)

    python bench/gpu_ab.py --out $OUT/gpu_ab.json            # 2 GPUs; about 25 s a process

The profile (real.profile) times every runner-level row on one GPU (--device-id, default 0), while the
engine decodes on GPU1 in pd/pipeline/adaptive. If the two GPUs differ by more than the fidelity bar, a
decode row should be timed on the decode GPU. This times the same decode and prefill steps (the profile's
own runner and timer, more reps) in fresh processes on GPU0, GPU1, GPU1, GPU0 (ABBA, so a drift over the
call cancels), and reads each GPU's clocks, power and temperature before each process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results_io import results_path, write_results  # noqa: E402

DECODE = ((16, 1024), (64, 1024), (256, 1024))  # (batch, context)
PREFILL = ((1, 1024), (1, 4096), (16, 1024))  # (sequences, tokens each)
CPU_DECODE, CPU_PREFILL = ((4, 128),), ((1, 128), (2, 128))  # the smoke test's shapes


def child(device_id: int, reps: int, model: str, kind: str = "cuda") -> dict:
    """One fresh process: the profile's rows at a few shapes on cuda:device_id (milliseconds).
    kind "cpu": the same code on the CPU (a smoke test; the device id is only a label there)."""
    import torch

    from real.profile import median_s, prefill_batch, profile_runner
    from real.testing import fake_decode_batch

    device = torch.device(f"cuda:{device_id}" if kind == "cuda" else "cpu")
    runner = profile_runner(model, device, 256, 4096, 524288 if kind == "cuda" else 16384)
    out = {"gpu": torch.cuda.get_device_name(device) if kind == "cuda" else "cpu", "device_id": device_id}
    with torch.inference_mode():
        for _round in range(2):  # the first round warms up (first replays, allocator); the second is kept
            for b, c in (DECODE if kind == "cuda" else CPU_DECODE):
                batch = fake_decode_batch(runner, b, c)
                out[f"decode b{b} ctx{c}"] = median_s(lambda: runner.run(batch, {}), device, reps) * 1e3
            for n, t in (PREFILL if kind == "cuda" else CPU_PREFILL):
                batch = prefill_batch(runner, [t] * n, 0)
                out[f"prefill {n}x{t}"] = median_s(lambda: runner.run(batch, {}), device, reps) * 1e3
    runner.close()
    return out


def gpu_state(kind: str = "cuda") -> list[str]:
    if kind != "cuda":
        return []
    q = "index,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return [f"nvidia-smi failed: {e}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", default="0110", help="GPU of each fresh process, in order (default 0110: ABBA)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions a row (median kept; default 20)")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test (use --model tiny)")
    ap.add_argument("--out", default=None, help="the JSON (default bench/results/gpu_ab_<gpu>.json)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.reps, args.model, args.device)))
        return 0
    runs = []
    for i, ch in enumerate(args.order):
        state = gpu_state(args.device)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", ch, "--reps", str(args.reps), "--model",
                               args.model, "--device", args.device], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"process {i} (GPU{ch}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(process=i, seconds=time.perf_counter() - t0, gpu_state_before=state)
        runs.append(row)
        print(f"process {i} GPU{ch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                  if k.startswith(("decode", "prefill"))), flush=True)
    keys = [k for k in runs[0] if k.startswith(("decode", "prefill"))]
    by_gpu = {g: {k: sum(r[k] for r in runs if r["device_id"] == g) / sum(r["device_id"] == g for r in runs)
                  for k in keys} for g in sorted({r["device_id"] for r in runs})}
    result = dict(gpu=runs[0]["gpu"], date=date.today().isoformat(),
                  command="python bench/gpu_ab.py " + " ".join(sys.argv[1:]), runs=runs, mean_ms_by_gpu=by_gpu)
    if len(by_gpu) == 2:
        result["gpu1_over_gpu0"] = {k: by_gpu[1][k] / by_gpu[0][k] for k in keys}
        print("GPU1 / GPU0: " + ", ".join(f"{k} {v:.3f}" for k, v in result["gpu1_over_gpu0"].items()))
    same = {}
    for g in by_gpu:  # the same GPU in two fresh processes: process-to-process spread
        rs = [r for r in runs if r["device_id"] == g]
        if len(rs) >= 2:
            same[str(g)] = {k: rs[1][k] / rs[0][k] for k in keys}
    result["second_process_over_first"] = same
    for g, v in same.items():
        print(f"GPU{g}, second process / first: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    path = results_path(args.out, "gpu_ab", result["gpu"])
    write_results(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
