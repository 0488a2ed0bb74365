"""How long a forward pass, a decode step and a KV copy take: one interface, models behind it.

The simulator asks a `CostModel` a few hundred thousand times per run, so every call is a
handful of float operations on constants precomputed in `__init__` (no numpy, no per-layer loop).
`CalibratedCostModel` (sim/calibrated.py) interpolates a measured profile behind the same protocol.

`AnalyticCostModel`: a roofline per stage and layer, fitted to ../shared/notes/hardware-facts.md.
  stage_s   = floor_s + max(compute_s, memory_s, host_s)
  compute_s = flops / (bf16_flops * eff * sms / all_sms)
  memory_s  = bytes / (hbm_bytes_per_s * hbm_eff * min(1, sms / sms_to_saturate_hbm))
host_s is the CPU time to issue the stage's kernels (the table was measured in eager PyTorch);
the GPU hides it when its own work is longer. One thread issues both partitions' streams, so in
a concurrent attention || FFN slot the host times ADD while the GPU work overlaps: the reason a
split loses at small batch. Concurrent stages share HBM in proportion to their demand (`_pair_s`):
the reason a memory-bound attention beside a memory-bound FFN gains little.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, Sequence

from policies.specs import HardwareSpec, ModelSpec, hardware_spec, model_spec


@dataclass(slots=True)
class DecodeCost:
    step_s: float  # wall time of one decode step on GPU1: all layers + LM head + sampling
    attn_busy_s: float  # time the attention work kept its SMs busy during the step
    ffn_busy_s: float  # same for the FFN work (LM head/sampling counted in neither)


@dataclass(slots=True)
class LayerTimes:
    """One layer, one batch: what the facts table measures (seconds)."""
    attn_s: float  # attention stage alone on the full GPU
    ffn_s: float  # FFN stage alone on the full GPU
    seq_s: float  # attention then FFN on the full GPU
    pair_s: float  # attention(B) on split[0] SMs concurrently with FFN(B) on split[1] SMs


class CostModel(Protocol):
    name: str

    def forward_s(self, chunks: Sequence[tuple[int, int]], decode_batch: int = 0,
                  decode_kv_tokens: int = 0) -> float: ...

    def decode_step(self, batch_size: int, kv_tokens: int, split: tuple[int, int] | None = None,
                    microbatches: int = 1) -> DecodeCost: ...

    def transfer_s(self, kv_bytes: int) -> float: ...

    def copy_interference_s(self, kv_bytes: int, batch_size: int) -> float: ...

    def engine_overhead_s(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                          colocated: bool = False) -> float: ...

    def decode_tail_s(self, batch_size: int, kv_tokens: int, max_context: int,
                      padded_batch: int | None = None) -> float: ...

    def decode_tail_scale(self, batch_size: int, excess: float, split: tuple[int, int] | None = None) -> float: ...

    def decode_device_factor(self, device: str, batch_size: int) -> float: ...

    def engine_step_spread(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                           colocated: bool = False): ...


@dataclass(slots=True)
class AnalyticParams:
    """Every tunable of the analytic model. Defaults: a least-squares fit (log error) to the H200
    facts table's attn, ffn, seq, pair and speed-up columns, measured in eager PyTorch."""
    hbm_eff: float = 0.93
    """Achievable fraction of peak HBM bandwidth: attention at batch 512 reads 2.1 GB in 0.48 ms on H200."""
    weight_bw_eff: float = 0.77
    """Fraction of that bandwidth skinny decode GEMMs reach streaming weights (8B FFN, batch 8: 302 MB in 93 us)."""
    sms_to_saturate_hbm: int = 64
    """A partition of s SMs pulls at most min(1, s / this) of HBM bandwidth. The table's 8B batch-128 pair
    is best with attention on only 48 SMs, so HBM saturates near half the GPU (48..64 fit about as well)."""
    gemm_eff: float = 0.71
    """Fraction of bf16 peak the projection/MLP GEMMs reach (8192^3 gets 0.8; the 8B FFN at batch 512 ~0.7)."""
    attn_eff: float = 0.40
    """Fraction of bf16 peak the attention core (QK^T, PV) reaches in prefill (FA2-class SDPA; not measured)."""
    attn_floor_s: float = 1e-6
    """GPU-side small-kernel floor of the attention stage; overlaps with the other partition. The eager
    table puts nearly all fixed cost in host issue time instead; raise these for CUDA-graph replays."""
    ffn_floor_s: float = 1e-6
    """GPU-side small-kernel floor of the FFN stage."""
    attn_host_s: float = 22e-6
    """CPU time to issue the attention stage's kernels (eager: attention at batch 8 is ~25 us for 34 MB)."""
    ffn_host_s: float = 64e-6
    """CPU time to issue the FFN stage's kernels (eager: the 0.6B FFN is flat at ~65 us up to batch 512)."""
    handoff_s: float = 7e-6
    """Cross-partition event record/wait per layer per micro-batch (and per concurrent pair): with the
    host times it sets the small-batch pair (0.094-0.101 ms in the table)."""
    lm_host_s: float = 15e-6
    """CPU time to issue the final norm + LM head."""
    sample_s: float = 40e-6
    """Fixed cost of sampling per step (softmax/argmax kernels and the token copy to host)."""
    sample_bytes_per_logit: float = 12.0
    """HBM bytes per logit for sampling: bf16 write + fp32 cast write + fp32 read."""


class AnalyticCostModel:
    """Roofline per stage, host-issue bound, HBM contention between partitions; see module doc."""

    def __init__(self, hardware: HardwareSpec, model: ModelSpec, params: AnalyticParams | None = None):
        self.hardware, self.model = hardware, model
        p = self.params = params or AnalyticParams()
        self.name = "analytic"
        m, hw, dt = model, hardware, model.dtype_bytes
        h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
        self.layers, self.sms = m.num_layers, hw.sms
        self.hbm_bytes_per_s = hw.hbm_bytes_per_s * p.hbm_eff  # full-GPU achievable bandwidth
        self.sat_sms = float(p.sms_to_saturate_hbm)
        gemm_flops_per_s = hw.bf16_flops * p.gemm_eff
        # Compute is kept as full-GPU seconds per unit; a partition divides by sms_part / sms.
        self.attn_s_per_token = 2 * m.attn_params_per_layer / gemm_flops_per_s
        self.attn_s_per_pair = 4 * q / (hw.bf16_flops * p.attn_eff)  # QK^T + PV, one query-key pair
        self.ffn_s_per_token = 2 * m.ffn_params_per_layer / gemm_flops_per_s
        # Memory is kept as full-GPU seconds: weights at the GEMM streaming rate, the rest at hbm_eff.
        bw, wbw = self.hbm_bytes_per_s, self.hbm_bytes_per_s * p.weight_bw_eff
        self.attn_weight_s = m.attn_params_per_layer * dt / wbw
        self.ffn_weight_s = m.ffn_params_per_layer * dt / wbw
        # Activations eager PyTorch writes and reads back (norms, rope, residuals) per token.
        self.attn_act_s, self.ffn_act_s = (7 * h + 8 * q + 8 * kv) * dt / bw, (7 * h + 6 * inter) * dt / bw
        self.kv_s_per_token = 2 * kv * dt / bw  # K and V of one token, one layer
        self.lm_s_per_token = 2 * m.lm_head_params / gemm_flops_per_s
        self.lm_weight_s = m.lm_head_params * dt / wbw
        self.logit_s = m.vocab_size * p.sample_bytes_per_logit / bw
        self.attn_floor_s, self.ffn_floor_s = p.attn_floor_s, p.ffn_floor_s
        # One thread issues both streams, so a concurrent slot is at least both issue times plus the
        # GPU tail of the last stage issued (the FFN's floor).
        self.pair_host_s = p.attn_host_s + p.ffn_host_s + max(p.attn_floor_s, p.ffn_floor_s)
        self.attn_host_s, self.ffn_host_s, self.handoff_s = p.attn_host_s, p.ffn_host_s, p.handoff_s
        self.lm_host_s, self.sample_s = p.lm_host_s, p.sample_s
        self.link_latency_s, self.link_bytes_per_s = hw.nvlink_latency_s, hw.nvlink_bytes_per_s

    # ---- per-stage work: (compute_s, memory_s), both for the full GPU ----
    def _attn_work(self, tokens: float, pairs: float, kv_io_tokens: float) -> tuple[float, float]:
        return (tokens * self.attn_s_per_token + pairs * self.attn_s_per_pair,
                self.attn_weight_s + tokens * self.attn_act_s + kv_io_tokens * self.kv_s_per_token)

    def _ffn_work(self, tokens: float) -> tuple[float, float]:
        return tokens * self.ffn_s_per_token, self.ffn_weight_s + tokens * self.ffn_act_s

    def _gpu_s(self, compute_s: float, memory_s: float, sms: int) -> float:
        """Roofline on a partition: compute scales with its SMs, bandwidth saturates at sat_sms."""
        bw_frac = sms / self.sat_sms
        return max(compute_s * self.sms / sms, memory_s / bw_frac if bw_frac < 1.0 else memory_s)

    def stage_s(self, stage: str, batch_size: float, kv_tokens: float, sms: int | None = None) -> float:
        """One decode stage ("attn" | "ffn") of one layer alone on `sms` SMs (default: all)."""
        sms = sms or self.sms
        if stage == "attn":
            c, mem = self._attn_work(batch_size, kv_tokens, kv_tokens + batch_size)
            return self.attn_floor_s + max(self._gpu_s(c, mem, sms), self.attn_host_s)
        c, mem = self._ffn_work(batch_size)
        return self.ffn_floor_s + max(self._gpu_s(c, mem, sms), self.ffn_host_s)

    def _pair_s(self, attn_gpu_s: float, attn_mem_s: float, ffn_gpu_s: float, ffn_mem_s: float) -> tuple[float, float, float]:
        """Attention || FFN on disjoint partitions -> (slot_s, attn_busy_s, ffn_busy_s).

        Contention rule: a stage alone keeps the memory system busy a fraction u = memory_s (full-GPU
        rate) / its time on its partition. If u_attn + u_ffn > 1, both are slowed by k = u_attn + u_ffn
        while they overlap (bandwidth shared in proportion to demand); after the shorter one ends the
        longer runs alone: pair = long + (k - 1) * short. GPU floors overlap; host issue does not, so
        slot_s = max(pair, attn_host_s + ffn_host_s + floor) + handoff_s.
        """
        attn_gpu_s += self.attn_floor_s
        ffn_gpu_s += self.ffn_floor_s
        k = attn_mem_s / attn_gpu_s + ffn_mem_s / ffn_gpu_s
        if k < 1.0:
            k = 1.0
        if attn_gpu_s >= ffn_gpu_s:
            attn_busy, ffn_busy = attn_gpu_s + (k - 1.0) * ffn_gpu_s, k * ffn_gpu_s
            work = attn_busy
        else:
            attn_busy, ffn_busy = k * attn_gpu_s, ffn_gpu_s + (k - 1.0) * attn_gpu_s
            work = ffn_busy
        return (work if work > self.pair_host_s else self.pair_host_s) + self.handoff_s, attn_busy, ffn_busy

    # ---- the interface ----
    def forward_s(self, chunks: Sequence[tuple[int, int]], decode_batch: int = 0, decode_kv_tokens: int = 0,
                  pad_tokens: int = 0) -> float:
        """Whole-GPU forward of prefill chunks (new_tokens, context_before) plus a decode batch. `pad_tokens`:
        padding rows a CUDA graph's token bucket adds, which go through every matmul and elementwise op but
        attend to nothing and store nothing."""
        tokens, pairs, kv_io = decode_batch + pad_tokens, decode_kv_tokens, decode_kv_tokens + decode_batch
        for new, ctx in chunks:
            tokens += new
            pairs += new * ctx + new * (new + 1) * 0.5  # causal: query i sees ctx + i + 1 keys
            kv_io += ctx + 2 * new  # read context and the chunk's own keys, write the chunk
        return self._full_step(tokens, pairs, kv_io, len(chunks) + decode_batch).step_s

    def _full_step(self, tokens: float, pairs: float, kv_io: float, lm_tokens: int) -> DecodeCost:
        """All layers on all SMs, stages back to back; shared by forward_s and unsplit decode_step."""
        if tokens <= 0:
            return DecodeCost(0.0, 0.0, 0.0)
        ac, am = self._attn_work(tokens, pairs, kv_io)
        fc, fm = self._ffn_work(tokens)
        attn_gpu = self.attn_floor_s + (ac if ac > am else am)
        ffn_gpu = self.ffn_floor_s + (fc if fc > fm else fm)
        attn = max(attn_gpu, self.attn_floor_s + self.attn_host_s)
        ffn = max(ffn_gpu, self.ffn_floor_s + self.ffn_host_s)
        L = self.layers
        return DecodeCost(L * (attn + ffn) + self._lm_s(lm_tokens), L * attn_gpu, L * ffn_gpu)

    def _lm_s(self, lm_tokens: int) -> float:
        """Final norm + LM head + sampling, always on the full GPU (after the split pipeline drains)."""
        if lm_tokens <= 0:
            return 0.0
        lm_gpu = max(lm_tokens * self.lm_s_per_token, self.lm_weight_s + lm_tokens * self.logit_s)
        return (lm_gpu if lm_gpu > self.lm_host_s else self.lm_host_s) + self.sample_s

    def decode_step(self, batch_size: int, kv_tokens: int, split: tuple[int, int] | None = None,
                    microbatches: int = 1) -> DecodeCost:
        """GPU1 decode step; with a split, `microbatches` ping-pong attention/FFN layer by layer.

        Micro-batches are taken as equal (batch/m sequences, kv/m tokens each, m <= batch); each
        re-reads the weights. Attention(i) pairs with FFN(i-1) and, with m >= 2, the slower
        partition never waits, so with slot_s from `_pair_s` (handoff included) and a, f the
        stage-alone times on their partitions, L layers take
            a + f + (L*m - 1) * slot_s + handoff_s   (the first attention and the last FFN run alone);
        m = 1 takes L * (a + f + handoff_s). The LM head then runs once on the full GPU: the partitions
        are idle by then and it reads its weights once per step instead of once per micro-batch.
        """
        if split is None:
            return self._full_step(batch_size, kv_tokens, kv_tokens + batch_size, batch_size)
        if batch_size <= 0:
            return DecodeCost(0.0, 0.0, 0.0)
        attn_sms, ffn_sms = split
        m = microbatches if microbatches < batch_size else batch_size
        if m < 1:
            m = 1
        mb, mb_kv = batch_size / m, kv_tokens / m
        ac, am = self._attn_work(mb, mb_kv, mb_kv + mb)
        fc, fm = self._ffn_work(mb)
        attn_gpu, ffn_gpu = self._gpu_s(ac, am, attn_sms), self._gpu_s(fc, fm, ffn_sms)
        a = self.attn_floor_s + max(attn_gpu, self.attn_host_s)
        f = self.ffn_floor_s + max(ffn_gpu, self.ffn_host_s)
        L = self.layers
        if m == 1:
            layers_s = L * (a + f + self.handoff_s)
            attn_busy, ffn_busy = L * (self.attn_floor_s + attn_gpu), L * (self.ffn_floor_s + ffn_gpu)
        else:
            slot, slot_attn, slot_ffn = self._pair_s(attn_gpu, am, ffn_gpu, fm)
            n = L * m
            layers_s = a + f + (n - 1) * slot + self.handoff_s
            attn_busy = self.attn_floor_s + attn_gpu + (n - 1) * slot_attn
            ffn_busy = self.ffn_floor_s + ffn_gpu + (n - 1) * slot_ffn
        return DecodeCost(layers_s + self._lm_s(batch_size), attn_busy, ffn_busy)

    def transfer_s(self, kv_bytes: int) -> float:
        """GPU0 -> GPU1 copy: a fixed latency plus bytes at the large-transfer link bandwidth
        (25 us + bytes / 393 GB/s gives the measured 246 GB/s at 16 MB and 382 GB/s at 256 MB)."""
        return self.link_latency_s + kv_bytes / self.link_bytes_per_s  # 0 bytes: a failed attempt still costs the latency

    def copy_interference_s(self, kv_bytes: int, batch_size: int) -> float:
        """What a KV copy adds to the decode steps it overlaps on the GPU its kernel runs on: only a profile's
        decode_copy rows measure it (sim/calibrated.py); not modelled analytically."""
        return 0.0

    overhead_depends_on_other_gpu = False

    def engine_overhead_s(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                          colocated: bool = False) -> float:
        """The real engine's per-step overhead beyond the step itself: not modelled analytically (only a
        profile's engine_* rows measure it, sim/overhead.py)."""
        return 0.0

    def decode_tail_s(self, batch_size: int, kv_tokens: int, max_context: int,
                      padded_batch: int | None = None) -> float:
        """The decode tail of mixed context lengths (sim/calibrated.py): needs a profile's measured
        per-program streaming rate (decode_program rows); not modelled analytically."""
        return 0.0

    def decode_tail_scale(self, batch_size: int, excess: float, split: tuple[int, int] | None = None) -> float:
        """The measured over the modelled decode tail: 1 (only a profile's decode_tail rows measure it)."""
        return 1.0

    def decode_device_factor(self, device: str, batch_size: int) -> float:
        """A decode step on `device` over the modelled one: the GPUs are alike here (a profile's
        decode_prefill_gpu rows measure them apart, sim/calibrated.py)."""
        return 1.0

    has_step_spread = False

    def engine_step_spread(self, stage: str, batch_size: int, tokens: int, other_busy: bool = False,
                           colocated: bool = False):
        """No measured spread: every step takes its modelled time (sim/variability.py)."""
        return None

    # ---- what the facts table measures ----
    def layer_times(self, batch_size: int, kv_tokens: int, split: tuple[int, int]) -> LayerTimes:
        """Per-layer attn, ffn, seq on the full GPU and the concurrent pair on `split`, one batch."""
        attn, ffn = self.stage_s("attn", batch_size, kv_tokens), self.stage_s("ffn", batch_size, kv_tokens)
        ac, am = self._attn_work(batch_size, kv_tokens, kv_tokens + batch_size)
        fc, fm = self._ffn_work(batch_size)
        pair = self._pair_s(self._gpu_s(ac, am, split[0]), am, self._gpu_s(fc, fm, split[1]), fm)[0]
        return LayerTimes(attn, ffn, attn + ffn, pair)

    def best_split(self, batch_size: int, kv_tokens: int, tie_tol: float = 0.005) -> tuple[tuple[int, int], LayerTimes]:
        """The allowed split with the shortest concurrent pair for this batch.

        Once a partition saturates HBM, many splits tie; take the middle of the splits within
        `tie_tol` of the best, away from the cliffs on either side.
        """
        splits = self.hardware.allowed_splits()
        pairs = [self.layer_times(batch_size, kv_tokens, s).pair_s for s in splits]
        near = [s for s, t in zip(splits, pairs) if t <= min(pairs) * (1.0 + tie_tol)]
        best = near[(len(near) - 1) // 2]
        return best, self.layer_times(batch_size, kv_tokens, best)


def layer_pair_times(model: AnalyticCostModel, batch_size: int, kv_tokens: int,
                     split: tuple[int, int]) -> tuple[float, float, float, float]:
    """(attn_s, ffn_s, seq_s, pair_s) per layer, the facts-table columns."""
    t = model.layer_times(batch_size, kv_tokens, split)
    return t.attn_s, t.ffn_s, t.seq_s, t.pair_s


def make_cost_model(hardware: HardwareSpec | str, model: ModelSpec | str, kind: str = "analytic",
                    profile=None, **overrides) -> CostModel:
    """Build a cost model by kind: "analytic", or "calibrated" from `profile` (a profile CSV path or
    DataFrame, see sim/calibrated.py); `overrides` set AnalyticParams fields by name (for calibrated:
    of the analytic model it falls back on)."""
    hardware = hardware_spec(hardware) if isinstance(hardware, str) else hardware
    model = model_spec(model) if isinstance(model, str) else model
    if kind not in ("analytic", "calibrated"):
        raise ValueError(f"unknown cost model kind {kind!r}; choose analytic or calibrated")
    names = {f.name for f in fields(AnalyticParams)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown AnalyticParams field(s) {sorted(unknown)}; choose from {sorted(names)}")
    analytic = AnalyticCostModel(hardware, model, AnalyticParams(**overrides))
    if kind == "analytic":
        return analytic
    if profile is None:
        raise ValueError("a calibrated cost model needs a profile (traces/profiles/<hardware>-<model>.csv)")
    from .calibrated import CalibratedCostModel  # it imports this module

    return CalibratedCostModel(profile, hardware, model, base=analytic)


def microbatch_tail_s(cost, contexts: list[int], microbatches: int = 1, split: tuple[int, int] | None = None) -> float:
    """unscaled_microbatch_tail_s times the cost model's measured/modelled tail at this step's batch and excess
    (longest - mean context; decode_tail_scale: 1 where the profile has no decode_tail rows), sequential (split
    None) or pipelined on `split`."""
    tail = unscaled_microbatch_tail_s(cost, contexts, microbatches)
    if tail <= 0:
        return tail
    return tail * cost.decode_tail_scale(len(contexts), max(contexts) - sum(contexts) / len(contexts), split)


def unscaled_microbatch_tail_s(cost, contexts: list[int], microbatches: int = 1) -> float:
    """What mixed context lengths add to a decode step (the cost model's decode_tail_s) with `microbatches`
    micro-batches: each runs its own paged-attention kernel per layer, on the attention partition one after
    the other, and each waits for its own longest sequence, so the tails add up. The real engine's
    micro-batches are contiguous slices of the batch padded to its CUDA-graph bucket (real/graphs.py
    capture_pipeline: bounds at bucket * i / m), so 33 sequences run as 24 + 9 in two halves of 48 rows, and
    each kernel's grid (its context splits) follows its padded half, not an even share of the sequences
    (cost.graph_batch; unpadded, even slices without it). Pipelined steps in the 2x H100 fidelity run exceeded
    the uniform-context profile by 1.8 / 2.4 / 4.7 / 7.7 ms with the batch's longest context at <= 2k / 2-4k
    / 4-6k / 6-9k tokens, about twice the one-kernel tail (0.5 / 0.8 / 2.8 / 4.8 ms) plus the ~1 ms of engine
    overhead sequential steps show."""
    n = len(contexts)  # KV lengths before the step: each attends over its length + 1
    m = max(1, min(microbatches, n))
    if m == 1:
        return cost.decode_tail_s(n, sum(contexts) + n, max(contexts)) if n else 0.0
    graph_batch = getattr(cost, "graph_batch", None)
    rows = graph_batch(n) if graph_batch is not None else n
    total = 0.0
    for i in range(m):
        lo, hi = rows * i // m, rows * (i + 1) // m
        part = contexts[min(lo, n):min(hi, n)]
        if part:
            total += cost.decode_tail_s(len(part), sum(part) + len(part), max(part), padded_batch=hi - lo)
    return total
