"""Simulator vs real engine on one workload, policy by policy (issue 6), in two halves:

    # on the 2-GPU node (no simpy there): real runs, one run folder per policy, packed into one file
    python bench/fidelity_bench.py real --trace T --num-requests 2000 --rate-scale 8 --out $OUT/fidelity_runs.tgz
    # here: the same workload through the calibrated simulator, then analysis.fidelity
    python bench/fidelity_bench.py sim fidelity_runs.tgz --out bench/results/fidelity_<gpu>.json

The real half runs `python -m real.run` once per policy with a per-run time limit, so one slow policy
cannot eat the others' time; a policy that times out is recorded as not run. The sim half reads each
real run's run.json for the workload, rate scale, request count, model, the policy configuration the
engine ran (its scheduler limits differ from the presets: prefill budget, context limit), its split step
and its KV blocks per GPU, and simulates the same with the profile matching the GPU (`--profile` to
choose one). It also simulates each workload 2% faster and reports the elasticity of every latency to
the load (`load_elasticity`): near the decode GPU's saturation TPOT moves more than the load (1.1-2.3x
in the Azure conv x8 runs on 2x H100 and 2x H200, single's TTFT ~20x), so a 1% error in a step's time
reads as a larger latency error there.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POLICIES = ("single", "pd", "pipeline", "adaptive")
ELASTICITY_STEP = 0.02
ELASTICITY_METRICS = ("ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms")


def real_half(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    runs = work / "fidelity_runs"
    status = {}

    def command(policy: str, requests: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "real.run", "--policy", policy, "--workload", args.trace, "--num-requests",
                str(requests), "--rate-scale", str(args.rate_scale), "--model", args.model,
                "--split-step", str(args.split_step), "--device", args.device, "--kv-transport", args.kv_transport,
                "--out", str(out), "--quiet"]

    if args.warm_up and _has_cuda(args.device):  # a fresh node's first process compiles kernels while it serves
        t0 = time.perf_counter()  # (pd served first on 2x H200: TTFT p50 320 vs 70 ms): an untimed run first
        try:
            proc = subprocess.run(command("adaptive", 40, work / "warm_up"), cwd=ROOT, timeout=args.run_timeout_s,
                                  capture_output=True, text=True)
            print(f"warm-up   exit {proc.returncode} ({time.perf_counter() - t0:.0f} s)", flush=True)
        except subprocess.TimeoutExpired:
            print(f"warm-up   timed out after {args.run_timeout_s} s", flush=True)
    start = time.perf_counter()
    for policy, name in run_order(args.policies, args.repeat, args.first_round):
        limit = args.run_timeout_s
        if args.budget_s is not None:  # what is left of the whole call's budget
            limit = min(limit, int(args.budget_s - (time.perf_counter() - start)))
            if limit < args.min_run_s:
                status[name] = f"not run: {max(limit, 0)} s of --budget-s left"
                print(f"{name:12s} {status[name]}", flush=True)
                continue
        cmd = command(policy, args.num_requests, runs / name)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True)
            status[name] = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            status[name] = f"timed out after {limit} s"
        print(f"{name:12s} {status[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        pack(runs, status, args.out)  # after every run: a call killed later keeps the runs that finished
    pack(runs, status, args.out)
    print(f"wrote {args.out}")
    return 0


def run_order(policies, repeat: int, first_round: int = 1) -> list[tuple[str, str]]:
    """(policy, run folder name) in serving order: rounds first_round .. first_round + repeat - 1, the even ones
    reversed (ABBA), so a drift over the call does not fall on one policy; round 1's folders are the policies'
    names, round r's <policy>_r<r>. A later call on the same machine continues with --first-round."""
    out = []
    for r in range(first_round, first_round + repeat):
        for policy in (policies if r % 2 == 1 else list(reversed(policies))):
            out.append((policy, policy if r == 1 else f"{policy}_r{r}"))
    return out


def pack(runs: Path, status: dict, out: str) -> None:
    """Write the run folders so far and their status into the .tgz (replacing it whole)."""
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "status.json").write_text(json.dumps(dict(status=status, command=" ".join(sys.argv)), indent=2))
    tmp = Path(f"{out}.partial")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(runs, arcname="fidelity_runs")
    tmp.replace(out)


def _has_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _flag(command: str, name: str, default: str) -> str:
    """A flag's value in a recorded command line (run.json keeps the command, not every parsed flag)."""
    parts = command.split()
    return parts[parts.index(name) + 1] if name in parts[:-1] else default


def step_ratios(real_dir: Path, cost) -> dict:
    """Real step time over what the cost model predicts for the same step, median, for GPU1 decode steps
    with and without GPU0 busy at the same time, and for GPU0 prefills: where the real engine is slower
    than its isolated profile, and whether that comes from the two GPUs sharing one host process."""
    import numpy as np
    import pandas as pd

    steps = pd.read_csv(real_dir / "steps.csv")
    g0 = steps[steps.device == "gpu0"]
    dec = steps[(steps.device == "gpu1") & (steps.stage == "decode")]
    s0, e0 = g0.t_start_s.to_numpy(), g0.t_end_s.to_numpy()
    out = {}
    if len(dec):
        pred = np.array([cost.decode_step(int(n), int(kv), (int(a), int(f)) if a else None, 2 if a else 1).step_s
                         for n, kv, a, f in zip(dec.batch_size, dec.kv_tokens, dec.attn_sms, dec.ffn_sms)])
        ratio = (dec.t_end_s - dec.t_start_s).to_numpy() / pred
        busy = np.array([((s0 < e) & (e0 > b)).any() for b, e in zip(dec.t_start_s, dec.t_end_s)])
        for name, mask in (("decode_gpu0_idle", ~busy), ("decode_gpu0_busy", busy)):
            if mask.any():
                out[name] = dict(steps=int(mask.sum()), median=float(np.median(ratio[mask])))
    pre = g0[g0.stage == "prefill"]
    if len(pre):
        pred = np.array([cost.forward_s([(int(t), 0)]) for t in pre.tokens])
        out["prefill"] = dict(steps=len(pre), median=float(np.median((pre.t_end_s - pre.t_start_s) / pred)))
    if not len(dec) and g0.stage.isin(["decode", "mixed"]).any():  # colocated (single): GPU0's own steps
        out["colocated_model_over_real"] = colocated_ratios(real_dir, cost)
    if len(dec):
        out["decode_model_over_real"] = decode_ratios(real_dir, cost)
    return out


def decode_ratios(real_dir: Path, cost) -> dict:
    """The sim's cost of a run's GPU1 decode steps at each step's own shape over their real periods
    (fidelity_diagnose.decode_at_shape), sequential and pipelined, over all and over steps of 64+ sequences:
    the step bias alone, without the queueing it feeds (2x H200, Azure conv x8: pd's steps modelled 3.6% short
    on the machine whose TPOT the sim put 8% under)."""
    from fidelity_diagnose import decode_at_shape

    return model_over_real_by_group(decode_at_shape(real_dir, cost))


def colocated_ratios(real_dir: Path, cost) -> dict:
    """The sim's cost of a colocated run's GPU0 decode and mixed steps at each step's own shape over their real
    time (fidelity_diagnose.colocated_at_shape), summed over all and over steps of 64+ decoding sequences: the
    run's own GPU speed against the profile's, without the queueing it feeds (two single runs of one machine
    read 1.6% over and 4.6% under at 64+)."""
    from fidelity_diagnose import colocated_at_shape

    return model_over_real_by_group(colocated_at_shape(real_dir, cost)[0])


def model_over_real_by_group(table) -> dict:
    """{group: model_over_real over all its steps, group_64_plus: over its bins of 64+ sequences} from a table
    indexed by (group, batch bin) with its totals in the bins named "all" (fidelity_diagnose's *_at_shape)."""
    out = {}
    for group in table.index.get_level_values(0).unique():
        rows = table.loc[group]
        bins = rows.drop(index="all", errors="ignore")
        big = bins[[iv.left >= 64 for iv in bins.index]]
        out[group] = float(rows.loc["all", "model_over_real"])
        if len(big):
            out[f"{group}_64_plus"] = float(big.model_s.sum() / big.real_s.sum())
    return out


def current_keys(overrides: dict) -> dict:
    """A recorded run's policy settings less the keys today's policies no longer have (a run from before
    the rebalancer's side-by-side duels carries its EWMA settings): the sim replays today's policies."""
    from dataclasses import fields

    from policies import PolicyConfig

    known = {f.name for f in fields(PolicyConfig)}
    out = {}
    for key, value in overrides.items():
        if key not in known:
            print(f"note: the run's policy setting {key!r} no longer exists; ignored", file=sys.stderr)
        elif isinstance(value, dict):
            section = {f.name for f in fields(getattr(PolicyConfig(), key))}
            dropped = sorted(set(value) - section)
            if dropped:
                print(f"note: the run's {key} settings {', '.join(dropped)} no longer exist; ignored", file=sys.stderr)
            out[key] = {k: v for k, v in value.items() if k in section}
        else:
            out[key] = value
    return out


def real_settings(info: dict) -> dict:
    """simulate() arguments that make the sim run what the real engine ran (from its run.json): the
    policy configuration as the engine set it, the split step and the KV blocks per GPU."""
    from policies import Capabilities
    from sim.engine import SimConfig

    pcfg = info.get("policy_config") or {}
    overrides = current_keys({k: v for k, v in pcfg.items() if k != "preset"})
    engine = info.get("engine_config") or {}
    split_step = engine.get("split_step_sms")
    if split_step is None:
        split_step = int(_flag(info.get("command", ""), "--split-step", "0"))
    gpus = int((info.get("hardware") or {}).get("count") or 2)
    return dict(overrides=overrides or None, split_step_sms=int(split_step),
                sim_config=SimConfig(capabilities=Capabilities(num_gpus=gpus),
                                     kv_blocks=int(info.get("kv_blocks_per_gpu") or 0),
                                     seed=int(info.get("seed") or 0)))


def simulate_real_run(real_dir: Path, args, seed_offset: int = 0, rate_factor: float = 1.0):
    """Simulate what the real run in `real_dir` served (its workload, policy settings, split step and KV
    blocks: real_settings), the step-time draws seeded `seed_offset` after the run's own and the arrival rate
    scaled by `rate_factor`. Returns (run.json, hardware preset, workload, rate scale, SimResult)."""
    from sim.run import simulate
    from traces.workload import make_workload

    info = json.loads((real_dir / "run.json").read_text())
    trace = args.trace or info["workload"]["source"]
    rate = float(_flag(info.get("command", ""), "--rate-scale", "1"))
    workload = make_workload(trace, num_requests=info["workload"]["requests"], rate_scale=rate * rate_factor,
                             seed=info.get("seed", 0))
    gpu = info.get("hardware", {}).get("device", "")
    hardware = args.hardware or ("h200x2" if "H200" in gpu else "h100x2")
    settings = real_settings(info)
    if seed_offset:
        settings["sim_config"] = replace(settings["sim_config"], seed=settings["sim_config"].seed + seed_offset)
    result = simulate(workload, policy=info["policy"], hardware=hardware, model=args.model, profile=args.profile,
                      **settings)
    return info, hardware, workload, rate, result


def write_sim_run(sim_dir: Path, info: dict, hardware: str, workload, rate: float, result, args) -> Path:
    from traces.run_folder import write_run

    write_run(sim_dir, requests=result.requests, steps=result.steps, decisions=result.decisions,
              run_info=dict(backend="sim", policy=info["policy"], hardware=hardware, model=args.model,
                            workload=dict(source=args.trace or info["workload"]["source"], rate_scale=rate,
                                          requests=len(workload.requests))),
              summary=result.summary)
    return sim_dir


def seed_spread(first: dict, pairs: list, work: Path, args) -> dict:
    """The errors and rankings again with the simulator's step-time draws reseeded (seeds 1..N-1 after the
    run's own): each real run is one draw of its p99s, and so is each simulation, so a p99 error or a
    ranking between policies a few percent apart is only as sure as it holds from seed to seed."""
    import numpy as np

    from analysis.fidelity import fidelity

    runs = [first]
    for i in range(1, args.seeds):
        seeded = [(write_sim_run(work / f"sim_seed{i}_{_first(real).name}", *simulate_real_run(_first(real), args, i),
                                 args), real) for _, real in pairs]
        runs.append(fidelity(seeded))
    spread = {}
    for key in ("mean_rel_err", "p99_rel_err"):
        spread[key] = {name: dict(min=min(v), median=float(np.median(v)), max=max(v))
                       for name in first[key] for v in [[r[key][name] for r in runs]]}
    verdicts = {m: [r["policy_ranking_agrees"][m] for r in runs] for m in first["policy_ranking_agrees"]}
    spread["policy_ranking_agrees_fraction"] = {  # None: one policy, no ranking to agree on
        m: None if all(v is None for v in vs) else sum(bool(v) for v in vs) / len(vs) for m, vs in verdicts.items()}
    return dict(seeds=len(runs), **spread)


def _first(real):
    """A pair's (first) real run folder: the real side is one folder or a list of replicates."""
    return real[0] if isinstance(real, list) else real


def extract_runs(archive, dest: Path) -> list[Path]:
    """The run folders (each holding a run.json) of a fidelity_bench archive, extracted under `dest`, sorted."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return sorted(p.parent for p in Path(dest).rglob("run.json"))


def replicate_groups(folders: list[Path]) -> list[list[Path]]:
    """Real run folders grouped by the policy their run.json names: one list per policy, in folder-name order
    (real_half's first round, `<policy>`, before its `<policy>_r2`...). Two folders of one name (two archives
    of the same round) are an error: they would be one run counted twice or two runs told apart by nothing."""
    names = [d.name for d in folders]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"error: run folder(s) {', '.join(twice)} in more than one archive: serve later rounds "
                         "with --first-round so their folders are <policy>_r<k>")
    groups: dict[str, list[Path]] = {}
    for d in sorted(folders, key=lambda p: (re.sub(r"_r\d+$", "", p.name), p.name)):
        groups.setdefault(json.loads((d / "run.json").read_text())["policy"], []).append(d)
    return [groups[k] for k in sorted(groups)]


def drop_rows(df, spec: str):
    """The rows one --drop-ops entry names: `OP` (all of that op's rows), `OP@B,B,...` (its rows at these batches)
    or `OP@<N` (its rows below batch N), e.g. `pipeline@24,48` or `pipeline@<16`: what a few knots change."""
    op, _, batches = spec.partition("@")
    rows = df.op == op
    if not batches:
        return rows
    try:
        at = df.batch < int(batches[1:]) if batches.startswith("<") else df.batch.isin([int(b) for b in batches.split(",")])
    except ValueError:
        raise SystemExit(f"error: --drop-ops {spec}: write OP, OP@B,B,... or OP@<N") from None
    return rows & at


def profile_without(args, run_json: Path, work: Path) -> Path:
    """A copy of the profile the sim would use, less the rows of --drop-ops (an ablation: what those
    measurements change), written under `work`."""
    from sim.calibrated import pick_profile
    from traces.profile import read_profile, write_profile

    gpu = json.loads(run_json.read_text()).get("hardware", {}).get("device", "")
    hardware = args.hardware or ("h200x2" if "H200" in gpu else "h100x2")
    source = pick_profile(hardware, args.model, profile=args.profile)
    if source is None:
        raise SystemExit(f"error: --drop-ops needs a profile; none for {hardware} + {args.model}")
    df, meta = read_profile(source)
    drop = df.op != df.op  # none yet
    for spec in args.drop_ops:
        rows = drop_rows(df, spec)
        if not rows.any():
            raise SystemExit(f"error: --drop-ops {spec}: no such rows in {source}")
        drop |= rows
    kept = df[~drop]
    meta = {**meta, "derived": f"{source} without its {', '.join(args.drop_ops)} rows (fidelity_bench --drop-ops)"}
    return write_profile(work / source.name, kept.to_dict("records"), meta)


def sim_half(args) -> int:
    from analysis.fidelity import fidelity
    from sim.calibrated import pick_profile
    from sim.cost_model import make_cost_model

    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    folders, status = [], {}
    for i, archive in enumerate(args.runs):  # several archives: rounds of one machine's runs (--first-round)
        folders += extract_runs(archive, work / f"archive{i}")
        status_file = next((work / f"archive{i}").rglob("status.json"), None)
        if status_file:
            status.update(json.loads(status_file.read_text())["status"])
    if not folders:
        raise SystemExit(f"error: no run folders (run.json) in {' '.join(args.runs)}")
    if args.drop_ops:
        args.profile = str(profile_without(args, folders[0] / "run.json", work))
    pairs, meta, elasticity = [], {}, {}
    groups = replicate_groups(folders)
    if args.policies:
        groups = [g for g in groups if json.loads((g[0] / "run.json").read_text())["policy"] in args.policies]
        if not groups:
            raise SystemExit(f"error: no {' or '.join(args.policies)} runs in {' '.join(args.runs)}")
    for real_dirs in groups:
        real_dir = real_dirs[0]  # replicates served one workload: one simulation stands for them all
        info, hardware, workload, rate, result = simulate_real_run(real_dir, args)
        # how hard the operating point is to predict: the same workload 2% faster, in the simulator
        nudged = simulate_real_run(real_dir, args, rate_factor=1 + ELASTICITY_STEP)[-1].summary
        elasticity[info["policy"]] = {m: (nudged[m] / result.summary[m] - 1) / ELASTICITY_STEP
                                      for m in ELASTICITY_METRICS if result.summary.get(m)}
        pairs.append((write_sim_run(work / f"sim_{real_dir.name}", info, hardware, workload, rate, result, args),
                      real_dirs if len(real_dirs) > 1 else real_dir))
        profile = pick_profile(hardware, args.model, profile=args.profile)
        cost = make_cost_model(hardware, args.model, kind="calibrated" if profile else "analytic", profile=profile)
        for real_dir in real_dirs:
            meta[real_dir.name] = dict(gpu=info.get("hardware", {}).get("device", ""), sim_hardware=hardware,
                                       requests=len(workload.requests), rate_scale=rate,
                                       real_command=json.loads((real_dir / "run.json").read_text()).get("command", ""),
                                       profile=str(Path(profile).relative_to(ROOT)) if profile and Path(profile).is_relative_to(ROOT) else str(profile),
                                       real_over_profile_step_time=step_ratios(real_dir, cost))
    out = dict(gpu=next(iter(meta.values()))["gpu"] if meta else "", date=date.today().isoformat(),
               command="python bench/fidelity_bench.py " + " ".join(sys.argv[1:]), real_status=status, runs=meta)
    out.update(fidelity(pairs))
    if args.seeds > 1 and pairs:
        out["seed_spread"] = seed_spread(out, pairs, work, args)
    out["load_elasticity"] = elasticity
    out["load_elasticity_note"] = (f"per policy, d log(metric) / d log(arrival rate) in the simulator at the run's load "
                                   f"(rate x {1 + ELASTICITY_STEP:g}): near saturation a small step-time error is a "
                                   "large latency error, about this many times over")
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({k: out[k] for k in ("mean_rel_err", "p99_rel_err", "policy_ranking_agrees",
                                          "policy_ranking_agrees_strict", "real_run_to_run", "sim_within_real_range",
                                          "load_elasticity") if k in out}, indent=1))
    print(f"wrote {args.out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="half", required=True)
    r = sub.add_parser("real", help="real runs on this (2-GPU) node -> a .tgz of run folders")
    r.add_argument("--trace", required=True)
    r.add_argument("--num-requests", type=int, default=2000)
    r.add_argument("--rate-scale", type=float, default=8.0)
    r.add_argument("--model", default="qwen3-0.6b")
    r.add_argument("--split-step", type=int, default=32)
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    r.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    r.add_argument("--kv-transport", default="auto", choices=("auto", "pull", "copy", "push"),
                   help="the engine's KV transport; match the profile's (its metadata's kv_transport)")
    r.add_argument("--repeat", type=int, default=1,
                   help="serve each policy this many times, each in a fresh process, rounds in ABBA order (folders "
                        "<policy>, <policy>_r2, ...): the sim half then compares against their mean and reports "
                        "their run-to-run spread (two single runs of Azure conv x8 on one 2x H200 read TTFT means of "
                        "31.2 and 38.5 ms)")
    r.add_argument("--first-round", type=int, default=1,
                   help="number the rounds from this one: a second device call on the same machine serves round 2 "
                        "(folders <policy>_r2, order reversed) into its own .tgz; the sim half takes both archives")
    r.add_argument("--run-timeout-s", type=int, default=150, help="per run, start-up included")
    r.add_argument("--budget-s", type=int, default=None,
                   help="all the runs together (a device call's limit less what came before): each run gets "
                        "what is left, up to --run-timeout-s; the .tgz is rewritten after every run")
    r.add_argument("--min-run-s", type=int, default=60, help="with --budget-s: skip a policy with less left")
    r.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, an untimed 40-request adaptive run first, so no timed run compiles kernels")
    r.add_argument("--out", required=True, help="the .tgz to write")
    s = sub.add_parser("sim", help="simulate the same workloads here and compare")
    s.add_argument("runs", nargs="+", help="the .tgz the real half wrote (several: rounds of one machine's runs, "
                                           "compared as replicates)")
    s.add_argument("--trace", default=None, help="the trace, if not at the path recorded in run.json")
    s.add_argument("--model", default="qwen3-0.6b")
    s.add_argument("--hardware", default=None, help="h100x2 or h200x2 (default: from the real runs' GPU name)")
    s.add_argument("--profile", default=None)
    s.add_argument("--drop-ops", nargs="+", default=None, metavar="OP",
                   help="simulate with the profile less these ops' rows (e.g. mixed decode_prefill_gpu; OP@24,48: only "
                        "at these batches; OP@<16: below batch 16): an ablation")
    s.add_argument("--policies", nargs="+", default=None, choices=POLICIES,
                   help="compare only these policies' runs (default: every run in the archives)")
    s.add_argument("--seeds", type=int, default=1,
                   help="also simulate with the step-time draws reseeded, this many seeds in all, and report "
                        "each error's min/median/max and how often each ranking agrees (seed_spread)")
    s.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.half == "sim" and args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.half == "real" and (args.repeat < 1 or args.first_round < 1):
        ap.error("--repeat and --first-round must be at least 1")
    return in_scratch_folder(real_half if args.half == "real" else sim_half, args, "fidelity-")


def in_scratch_folder(fn, args, prefix: str) -> int:
    """fn(args) with its temporary folders (run folders, extracted archives, simulated runs) under one that
    is removed when it returns: the results are the JSON and .tgz it writes."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        tempfile.tempdir = scratch
        try:
            return fn(args)
        finally:
            tempfile.tempdir = saved


if __name__ == "__main__":
    sys.exit(main())
