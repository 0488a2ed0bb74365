"""How closely the simulator predicts real runs: relative errors per metric and policy-ranking agreement.

    python -m analysis.fidelity SIM_RUN REAL_RUN [SIM_RUN REAL_RUN ...] [--json OUT]
    python -m analysis.fidelity SIM_RUN REAL_RUN,REAL_RUN_2[,...] ...    # replicates: one sim, several real runs

Relative error = (sim - real) / real, so +0.10 means the simulator reads 10% high. Both runs are
summarised from their tables with one SLO, so neither summary.json nor a changed SLO can skew it.
The simulator is useful for choosing a policy even with biased absolute numbers as long as it
orders the policies as the hardware does: that is what the ranking check tells.

Real runs of one workload and policy, each in a fresh process (replicates), are compared by their mean,
and the result says how far they spread from each other and whether the simulation falls inside them:
on 2x H200 two back-to-back single runs of Azure conv x8 read TTFT means of 31.2 and 38.5 ms (the
simulator's cost of their GPU0 steps, at each step's shape, 1.6% over the first run's and 4.6% under the
second's, near saturation), so one real run alone cannot tell a simulator error of that size from the
hardware's own run-to-run spread.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.metrics import DEFAULT_SLO_TPOT_MS, DEFAULT_SLO_TTFT_MS, Slo, summarize
from traces.run_folder import Run, load_run
from traces.schema import TraceSchemaError

METRICS = ("throughput_rps", "output_tok_s", "ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms",
           "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_s", "e2e_p99_s", "slo_attainment")
# the metrics policies are ranked by (higher or lower is better alike: agreement is about the order)
RANKING_METRICS = ("output_tok_s", "tpot_p99_ms")
RANKING_TIE = 0.01  # policies within 1% of each other on the hardware are tied: any order of theirs agrees


def _default_slo() -> Slo:
    return Slo(DEFAULT_SLO_TTFT_MS / 1e3, DEFAULT_SLO_TPOT_MS / 1e3)


def relative_error(sim: float, real: float) -> float:
    """(sim - real) / real; NaN when real is 0 or either is missing (no scale to compare against)."""
    if sim is None or real is None or math.isnan(sim) or math.isnan(real) or real == 0:
        return math.nan
    return (sim - real) / real


def policy_name(run: Run) -> str:
    return str(run.info.get("policy") or run.summary.get("policy") or run.path.name)


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def compare_runs(sim_run: Run | str | Path, real_run: Run | str | Path, slo: Slo | None = None) -> dict:
    """One sim/real pair: {"policy", "sim", "real", "rel_err"} with METRICS values and their errors."""
    slo = slo or _default_slo()
    sim_run, real_run = _as_run(sim_run), _as_run(real_run)
    sim = summarize(sim_run.requests, slo)
    real = summarize(real_run.requests, slo)
    return {
        "policy": policy_name(real_run) if real_run.info.get("policy") else policy_name(sim_run),
        "sim_path": str(sim_run.path),
        "real_path": str(real_run.path),
        "sim": {m: sim[m] for m in METRICS},
        "real": {m: real[m] for m in METRICS},
        "rel_err": {m: relative_error(sim[m], real[m]) for m in METRICS},
    }


def compare_replicates(sim_run: Run | str | Path, real_runs: list, slo: Slo | None = None) -> dict:
    """One simulation against several real runs of its workload and policy: compare_runs' record with "real"
    the replicates' mean of each metric (rel_err against it), plus "replicates": how many, each run's values
    and errors, the spread (max - min) / mean of each metric over them, and whether the sim lies within
    their range. One real run gives compare_runs' record unchanged."""
    if len(real_runs) == 1:
        return compare_runs(sim_run, real_runs[0], slo)
    slo = slo or _default_slo()
    sim_run, reals = _as_run(sim_run), [_as_run(r) for r in real_runs]
    sim = summarize(sim_run.requests, slo)
    each = [summarize(r.requests, slo) for r in reals]
    real_each = {m: [e[m] for e in each] for m in METRICS}
    mean = {m: _finite_mean(v) for m, v in real_each.items()}
    return {
        "policy": policy_name(reals[0]) if reals[0].info.get("policy") else policy_name(sim_run),
        "sim_path": str(sim_run.path),
        "real_path": ", ".join(str(r.path) for r in reals),
        "sim": {m: sim[m] for m in METRICS},
        "real": mean,
        "rel_err": {m: relative_error(sim[m], mean[m]) for m in METRICS},
        "replicates": {
            "runs": len(reals),
            "real_each": real_each,
            "rel_err_each": {m: [relative_error(sim[m], v) for v in vals] for m, vals in real_each.items()},
            "real_spread": {m: _spread(vals) for m, vals in real_each.items()},
            "sim_within_real_range": {m: _within(sim[m], vals) for m, vals in real_each.items()},
        },
    }


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _finite_mean(values) -> float:
    vals = _finite(values)
    return math.fsum(vals) / len(vals) if vals else math.nan


def _spread(values) -> float:
    """(max - min) / mean of the finite values: how far replicates of one real run differ; NaN without two."""
    vals = _finite(values)
    if len(vals) < 2 or _finite_mean(vals) == 0:
        return math.nan
    return (max(vals) - min(vals)) / abs(_finite_mean(vals))


def _within(value: float, values) -> bool | None:
    vals = _finite(values)
    if len(vals) < 2 or value is None or math.isnan(value):
        return None
    return min(vals) <= value <= max(vals)


def ranking_agrees(comparisons: list[dict], metric: str, tie: float = 0.0) -> bool | None:
    """Do sim and real order the policies the same by `metric`? None with fewer than two policies.

    Every pair of policies the hardware separates must be ordered the same way by the simulator. tie > 0:
    two policies whose real values differ by at most that fraction are a tie the hardware did not decide
    (pd and adaptive 0.03% apart on one run), so either order of theirs agrees; a policy with replicates
    widens it to their measured run-to-run spread (two pd runs of one machine differed by 17% in TPOT p99).
    tie = 0 is the strict order: only exact ties, spreads ignored."""
    if len({c["policy"] for c in comparisons}) < 2:
        return None

    def spread(c) -> float:
        got = (c.get("replicates") or {}).get("real_spread", {}).get(metric)
        return got if tie > 0 and got is not None and not math.isnan(got) else 0.0

    for i, a in enumerate(comparisons):
        for b in comparisons[i + 1:]:
            real_a, real_b = a["real"][metric], b["real"][metric]
            if abs(real_a - real_b) <= max(tie, spread(a), spread(b)) * max(abs(real_a), abs(real_b)):
                continue  # (tie = 0: only an exact tie)
            if (a["sim"][metric] - b["sim"][metric]) * (real_a - real_b) <= 0:
                return False
    return True


def _unique_policies(comparisons: list[dict]) -> None:
    """Two pairs of one policy (say two seeds) get policy#2 so the error maps keep both."""
    seen: dict[str, int] = {}
    for c in comparisons:
        seen[c["policy"]] = seen.get(c["policy"], 0) + 1
        if seen[c["policy"]] > 1:
            c["policy"] = f"{c['policy']}#{seen[c['policy']]}"


def fidelity(pairs: list[tuple], slo: Slo | None = None) -> dict:
    """Every pair compared, plus the error maps and ranking agreement. A pair's real side may be a list of
    real runs (replicates: compare_replicates), which are then compared by their mean.

    mean_rel_err / p99_rel_err: "ttft/<policy>" -> relative error of the mean (resp. p99) TTFT, same
    for tpot (and e2e for p99; summaries have no E2E mean). policy_ranking_agrees: ranking metric ->
    bool, or None with fewer than two policies. With replicates, real_run_to_run (the same keys: the real
    runs' spread, (max - min) / mean) and sim_within_real_range (bool) for those policies.
    """
    comparisons = [compare_replicates(sim, list(real), slo) if isinstance(real, (list, tuple))
                   else compare_runs(sim, real, slo) for sim, real in pairs]
    return fidelity_of(comparisons)


def fidelity_of(comparisons: list[dict]) -> dict:
    """fidelity() from records compare_runs / compare_replicates made."""
    _unique_policies(comparisons)
    mean_err, p99_err = {}, {}
    for c in comparisons:
        for lat in ("ttft", "tpot"):
            mean_err[f"{lat}/{c['policy']}"] = c["rel_err"][f"{lat}_mean_ms"]
            p99_err[f"{lat}/{c['policy']}"] = c["rel_err"][f"{lat}_p99_ms"]
        p99_err[f"e2e/{c['policy']}"] = c["rel_err"]["e2e_p99_s"]
    out = {
        "pairs": comparisons,
        "mean_rel_err": mean_err,
        "p99_rel_err": p99_err,
        "policy_ranking_agrees": {m: ranking_agrees(comparisons, m, RANKING_TIE) for m in RANKING_METRICS},
        "policy_ranking_agrees_strict": {m: ranking_agrees(comparisons, m) for m in RANKING_METRICS},
        "ranking_tie": RANKING_TIE,
    }
    spread, within = {}, {}
    for c in comparisons:
        rep = c.get("replicates")
        if not rep:
            continue
        for key, metric in (("ttft_mean", "ttft_mean_ms"), ("tpot_mean", "tpot_mean_ms"), ("ttft_p99", "ttft_p99_ms"),
                            ("tpot_p99", "tpot_p99_ms"), ("output_tok_s", "output_tok_s")):
            spread[f"{key}/{c['policy']}"] = rep["real_spread"][metric]
            within[f"{key}/{c['policy']}"] = rep["sim_within_real_range"][metric]
    if spread:
        out["real_run_to_run"] = spread
        out["sim_within_real_range"] = within
    return out


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.1%}"


def _num(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def format_fidelity(result: dict) -> str:
    """One block per pair (metric, sim, real, relative error), then the ranking verdicts."""
    lines = []
    for c in result["pairs"]:
        rep = c.get("replicates")
        lines.append(f"== {c['policy']}: sim {c['sim_path']} vs real {c['real_path']} ==")
        if rep:
            lines.append(f"  (real: the mean of {rep['runs']} runs; spread = (max - min) / mean over them)")
            lines.append(f"  {'metric':<16}{'sim':>12}{'real mean':>12}{'rel err':>10}{'spread':>9}{'in range':>10}"
                         "  real runs")
        else:
            lines.append(f"  {'metric':<16}{'sim':>12}{'real':>12}{'rel err':>10}")
        for m in METRICS:
            line = f"  {m:<16}{_num(c['sim'][m]):>12}{_num(c['real'][m]):>12}{_pct(c['rel_err'][m]):>10}"
            if rep:
                inside = rep["sim_within_real_range"][m]
                spread = rep["real_spread"][m]
                spread_text = "-" if spread is None or math.isnan(spread) else f"{spread:.1%}"
                inside_text = "-" if inside is None else ("yes" if inside else "no")
                line += f"{spread_text:>9}{inside_text:>10}  {' '.join(_num(v) for v in rep['real_each'][m])}"
            lines.append(line)
    strict = result.get("policy_ranking_agrees_strict", {})
    tie = result.get("ranking_tie", 0.0)
    for metric, agrees in result["policy_ranking_agrees"].items():
        verdict = "n/a (one policy)" if agrees is None else ("agrees" if agrees else "DISAGREES")
        if agrees is not None and tie:
            exact = strict.get(metric)
            verdict += (f" (policies within {tie:.0%} on the hardware count as tied; strict order: "
                        f"{'agrees' if exact else 'differs'})")
        lines.append(f"policy ranking by {metric}: {verdict}")
    return "\n".join(lines)


def _json_safe(value):
    """NaN -> null so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.fidelity", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="SIM_RUN REAL_RUN pairs; REAL_RUN may name replicates joined by commas (A,B): compared by their mean")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON here")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS)
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.runs) % 2:
        print(f"error: expected SIM_RUN REAL_RUN pairs, got {len(args.runs)} folders", file=sys.stderr)
        return 2
    pairs = [(sim, real.split(",") if "," in real else real) for sim, real in zip(args.runs[0::2], args.runs[1::2])]
    try:
        result = fidelity(pairs, Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3))
    except TraceSchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_fidelity(result))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(_json_safe(result), indent=2) + "\n")
        except OSError as e:
            print(f"error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
