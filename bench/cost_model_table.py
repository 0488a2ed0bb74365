"""Print the facts-file overlap table beside the analytic cost model's predictions.

Run: python bench/cost_model_table.py
Measured rows are H200 (../shared/notes/hardware-facts.md: one decode layer, bf16, context 1024,
eager PyTorch); the H100 block is what the same parameters predict there (nothing measured yet).
The last block is the whole decode step: 2 micro-batches at the best split vs sequential.
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


def predict(cm: AnalyticCostModel, batch_size: int) -> tuple[float, float, float, float, tuple[int, int], float]:
    """(attn_ms, ffn_ms, seq_ms, best_pair_ms, best_split, speed-up) for one layer."""
    split, t = cm.best_split(batch_size, batch_size * CONTEXT_TOKENS)
    return t.attn_s * 1e3, t.ffn_s * 1e3, t.seq_s * 1e3, t.pair_s * 1e3, split, t.seq_s / t.pair_s


def layer_table(hw: str) -> None:
    measured = hw == "h200x2"
    print(f"\n== {hw}: ms per layer, context {CONTEXT_TOKENS}, " + ("measured H200 / model ==" if measured else "model only =="))
    print(f"{'model':<11}{'batch':>6} | {'attn':>13} {'ffn':>13} {'seq':>13} | {'best pair (A:B SMs)':>33} | {'speed-up':>11}")
    for name, batch, attn, ffn, seq, pair, split, speedup in FACTS_H200:
        cm = AnalyticCostModel(hardware_spec(hw), model_spec(name))
        p_attn, p_ffn, p_seq, p_pair, p_split, p_speedup = predict(cm, batch)
        both = (lambda v, w: f"{v:.3f}/{w:.3f}") if measured else (lambda v, w: f"{w:.3f}")
        m_pair = f"{pair:.3f} ({split[0]}:{split[1]}) / " if measured else ""
        m_speedup = f"{speedup:.2f} / " if measured else ""
        print(f"{name:<11}{batch:>6} | {both(attn, p_attn):>13} {both(ffn, p_ffn):>13} {both(seq, p_seq):>13} | "
              f"{m_pair + f'{p_pair:.3f} ({p_split[0]}:{p_split[1]})':>33} | {m_speedup + f'{p_speedup:.2f}':>11}")


def step_table() -> None:
    print(f"\n== whole decode step (all layers + LM head), context {CONTEXT_TOKENS}: sequential vs 2 micro-batches, best split ==")
    print(f"{'hardware':<8} {'model':<11}{'batch':>6} | {'seq ms':>8} {'pipe ms':>8} {'split':>7} {'pipe/seq':>9}")
    for hw in ("h100x2", "h200x2"):
        for name in ("qwen3-0.6b", "qwen3-8b"):
            cm = AnalyticCostModel(hardware_spec(hw), model_spec(name))
            for batch in (8, 32, 128, 512):
                kv = batch * CONTEXT_TOKENS
                seq_s = cm.decode_step(batch, kv).step_s
                pipe_s, split = min((cm.decode_step(batch, kv, s, 2).step_s, s) for s in cm.hardware.allowed_splits())
                print(f"{hw:<8} {name:<11}{batch:>6} | {seq_s * 1e3:8.3f} {pipe_s * 1e3:8.3f} "
                      f"{f'{split[0]}:{split[1]}':>7} {pipe_s / seq_s:9.3f}")


def main() -> None:
    for hw in ("h200x2", "h100x2"):
        layer_table(hw)
    step_table()


if __name__ == "__main__":
    main()
