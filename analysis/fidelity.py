"""How closely the simulator predicts real runs: relative errors per metric and policy-ranking agreement.

    python -m analysis.fidelity SIM_RUN REAL_RUN [SIM_RUN REAL_RUN ...] [--json OUT]

Relative error = (sim - real) / real, so +0.10 means the simulator reads 10% high. Both runs are
summarised from their tables with one SLO, so neither summary.json nor a changed SLO can skew it.
The simulator is useful for choosing a policy even with biased absolute numbers as long as it
orders the policies as the hardware does: that is what the ranking check tells.
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


def ranking_agrees(comparisons: list[dict], metric: str, tie: float = 0.0) -> bool | None:
    """Do sim and real order the policies the same by `metric`? None with fewer than two policies.

    Every pair of policies the hardware separates must be ordered the same way by the simulator. tie > 0:
    two policies whose real values differ by at most that fraction are a tie the hardware did not decide
    (pd and adaptive 0.03% apart on one run), so either order of theirs agrees; tie = 0 is the strict order."""
    if len({c["policy"] for c in comparisons}) < 2:
        return None
    for i, a in enumerate(comparisons):
        for b in comparisons[i + 1:]:
            real_a, real_b = a["real"][metric], b["real"][metric]
            if abs(real_a - real_b) <= tie * max(abs(real_a), abs(real_b)):
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
    """Every pair compared, plus the error maps and ranking agreement.

    mean_rel_err / p99_rel_err: "ttft/<policy>" -> relative error of the mean (resp. p99) TTFT, same
    for tpot (and e2e for p99; summaries have no E2E mean). policy_ranking_agrees: ranking metric ->
    bool, or None with fewer than two policies.
    """
    comparisons = [compare_runs(sim, real, slo) for sim, real in pairs]
    _unique_policies(comparisons)
    mean_err, p99_err = {}, {}
    for c in comparisons:
        for lat in ("ttft", "tpot"):
            mean_err[f"{lat}/{c['policy']}"] = c["rel_err"][f"{lat}_mean_ms"]
            p99_err[f"{lat}/{c['policy']}"] = c["rel_err"][f"{lat}_p99_ms"]
        p99_err[f"e2e/{c['policy']}"] = c["rel_err"]["e2e_p99_s"]
    return {
        "pairs": comparisons,
        "mean_rel_err": mean_err,
        "p99_rel_err": p99_err,
        "policy_ranking_agrees": {m: ranking_agrees(comparisons, m, RANKING_TIE) for m in RANKING_METRICS},
        "policy_ranking_agrees_strict": {m: ranking_agrees(comparisons, m) for m in RANKING_METRICS},
        "ranking_tie": RANKING_TIE,
    }


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.1%}"


def _num(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def format_fidelity(result: dict) -> str:
    """One block per pair (metric, sim, real, relative error), then the ranking verdicts."""
    lines = []
    for c in result["pairs"]:
        lines.append(f"== {c['policy']}: sim {c['sim_path']} vs real {c['real_path']} ==")
        lines.append(f"  {'metric':<16}{'sim':>12}{'real':>12}{'rel err':>10}")
        for m in METRICS:
            lines.append(f"  {m:<16}{_num(c['sim'][m]):>12}{_num(c['real'][m]):>12}{_pct(c['rel_err'][m]):>10}")
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
    p.add_argument("runs", nargs="+", metavar="RUN", help="SIM_RUN REAL_RUN pairs")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON here")
    p.add_argument("--slo-ttft-ms", type=float, default=DEFAULT_SLO_TTFT_MS)
    p.add_argument("--slo-tpot-ms", type=float, default=DEFAULT_SLO_TPOT_MS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.runs) % 2:
        print(f"error: expected SIM_RUN REAL_RUN pairs, got {len(args.runs)} folders", file=sys.stderr)
        return 2
    pairs = list(zip(args.runs[0::2], args.runs[1::2]))
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
