"""Print the facts-file overlap table beside the analytic cost model's predictions.

Run: python bench/cost_model_table.py
Measured rows are H200 (../shared/notes/hardware-facts.md, one decode layer, bf16, context 1024);
the H100 block shows what the same parameters predict there (no measured table yet).
"""
from __future__ import annotations

from policies.specs import hardware_spec, model_spec
from sim.cost_model import AnalyticCostModel

CONTEXT_TOKENS = 1024
# (model, batch, attn_ms, ffn_ms, seq_ms, pair_ms, (attn_sms, ffn_sms), speed-up) measured on H200.
FACTS_H200 = [
    ("qwen3-8b", 8, 0.025, 0.093, 0.118, 0.134, (64, 68), 0.88),
    ("qwen3-8b", 128, 0.127, 0.107, 0.234, 0.230, (48, 84), 1.02),
    ("qwen3-8b", 512, 0.484, 0.240, 0.724, 0.672, (64, 68), 1.08),
    ("qwen3-0.6b", 8, 0.026, 0.065, 0.091, 0.101, (80, 52), 0.90),
    ("qwen3-0.6b", 32, 0.037, 0.066, 0.103, 0.094, (96, 36), 1.10),
    ("qwen3-0.6b", 128, 0.127, 0.062, 0.189, 0.144, (96, 36), 1.32),
    ("qwen3-0.6b", 512, 0.480, 0.068, 0.548, 0.511, (96, 36), 1.07),
]


def predict(hardware_name: str, model_name: str, batch_size: int) -> tuple[float, float, float, float, tuple[int, int], float]:
    """(attn_ms, ffn_ms, seq_ms, best_pair_ms, best_split, speed-up) from the analytic model."""
    cm = AnalyticCostModel(hardware_spec(hardware_name), model_spec(model_name))
    split, t = cm.best_split(batch_size, batch_size * CONTEXT_TOKENS)
    return t.attn_s * 1e3, t.ffn_s * 1e3, t.seq_s * 1e3, t.pair_s * 1e3, split, t.seq_s / t.pair_s


def main() -> None:
    head = f"{'model':<11}{'batch':>6} | {'attn':>13} {'ffn':>13} {'seq':>13} | {'best pair (A:B)':>31} | {'speed-up':>11}"
    for hw in ("h200x2", "h100x2"):
        print(f"\n== {hw}: measured (H200) / model, ms per layer, context {CONTEXT_TOKENS} ==")
        print(head)
        for name, batch, attn, ffn, seq, pair, split, speedup in FACTS_H200:
            p_attn, p_ffn, p_seq, p_pair, p_split, p_speedup = predict(hw, name, batch)
            pm = (lambda v, w: f"{v:.3f}/{w:.3f}") if hw == "h200x2" else (lambda v, w: f"  -  /{w:.3f}")
            m_split = f"{pair:.3f} ({split[0]}:{split[1]})" if hw == "h200x2" else "-"
            print(f"{name:<11}{batch:>6} | {pm(attn, p_attn):>13} {pm(ffn, p_ffn):>13} {pm(seq, p_seq):>13} | "
                  f"{m_split:>14} / {p_pair:.3f} ({p_split[0]}:{p_split[1]}) | "
                  f"{(f'{speedup:.2f}' if hw == 'h200x2' else '-'):>4} / {p_speedup:.2f}")


if __name__ == "__main__":
    main()
