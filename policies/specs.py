"""What the policies (and both bodies) need to know about the model and the hardware.

Model facts come from the published Hugging Face config.json files; hardware facts from
../shared/notes/hardware-facts.md (H200 measured, H100 from its data sheet where not measured).
Plain data, shared by sim/ and real/ so the two cannot disagree about a model's shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    tie_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    dtype_bytes: int = 2  # bf16

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_params_per_layer(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    @property
    def ffn_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        per_layer = self.attn_params_per_layer + self.ffn_params_per_layer
        return (embed + self.num_layers * per_layer) * self.dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    name: str
    gpu_name: str
    num_gpus: int
    sms: int
    hbm_bytes: int
    hbm_bytes_per_s: float  # peak HBM bandwidth
    bf16_flops: float  # dense peak
    nvlink_bytes_per_s: float  # one GPU0->GPU1 copy, large-transfer asymptote
    nvlink_latency_s: float  # fixed cost per copy (small copies are latency bound)
    copy_engines: int  # concurrent KV copies the link serves
    sm_granularity: int  # green-context partitions are multiples of this
    min_partition_sms: int

    def allowed_splits(self) -> list[tuple[int, int]]:
        """Every (attn_sms, ffn_sms) two disjoint green contexts can form on one GPU."""
        first = max(self.min_partition_sms, self.sm_granularity)
        return [(a, self.sms - a) for a in range(first, self.sms - self.min_partition_sms + 1, self.sm_granularity)]

    def with_split_step(self, split_step_sms: int) -> "HardwareSpec":
        """This GPU offering splits in steps of `split_step_sms` SMs (0: its granularity), as the real engine
        does for `--split-step` (real/engine.py hardware_of): rounded up to the granularity, at most half
        the GPU so that one split remains. The sim takes the same flag, so both search the same splits."""
        g = self.sm_granularity
        step = max(g, -(-split_step_sms // g) * g)
        return replace(self, sm_granularity=min(step, max(g, self.sms // 2 // g * g)))

    def to_dict(self) -> dict:
        return asdict(self)


GB = 1e9

MODELS: dict[str, ModelSpec] = {
    # Qwen/Qwen3-0.6B config.json
    "qwen3-0.6b": ModelSpec("qwen3-0.6b", num_layers=28, hidden_size=1024, num_heads=16, num_kv_heads=8,
                            head_dim=128, intermediate_size=3072, vocab_size=151936, max_position=40960,
                            tie_embeddings=True),
    # Qwen/Qwen3-8B config.json
    "qwen3-8b": ModelSpec("qwen3-8b", num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8,
                          head_dim=128, intermediate_size=12288, vocab_size=151936, max_position=40960,
                          tie_embeddings=False),
    # A CPU/CI-sized Qwen3 (random weights only).
    "tiny": ModelSpec("tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=512, max_position=4096, tie_embeddings=True,
                      dtype_bytes=4),
}

HARDWARE: dict[str, HardwareSpec] = {
    # H100 SXM 80GB HBM3: data sheet bandwidth and peak; NVLink as measured on the H200 node
    # (same NV18 NVLink4 fabric); re-measure with real.profile (issue 6).
    "h100x2": HardwareSpec("h100x2", "NVIDIA H100 80GB HBM3", num_gpus=2, sms=132, hbm_bytes=int(80 * GB),
                           hbm_bytes_per_s=3.35e12, bf16_flops=989e12, nvlink_bytes_per_s=393e9,
                           nvlink_latency_s=25e-6, copy_engines=1, sm_granularity=8, min_partition_sms=8),
    # H200 141GB: bandwidth 4.8 TB/s; NVLink 16 MB 246 GB/s, 256 MB 382 GB/s, 1 GB 393 GB/s measured
    # -> about 25 us + bytes / 393 GB/s.
    "h200x2": HardwareSpec("h200x2", "NVIDIA H200", num_gpus=2, sms=132, hbm_bytes=int(141 * GB),
                           hbm_bytes_per_s=4.8e12, bf16_flops=989e12, nvlink_bytes_per_s=393e9,
                           nvlink_latency_s=25e-6, copy_engines=1, sm_granularity=8, min_partition_sms=8),
}


def decode_context_splits(programs: int, sms: int) -> int:
    """Context splits per (sequence, kv head) of the engine's paged-decode kernel (real/attention.py) for
    `programs` = padded batch x kv heads on a GPU of `sms` SMs: enough programs for ~4 per SM, a power of
    two up to 16, 1 once there are >= 2 per SM. It depends on the padded batch only, so a CUDA graph per
    batch bucket stays valid. The simulator models the kernel with the same rule (sim/calibrated.py:
    one unsplit program streams the longest sequence's KV alone, the decode tail). (H200, qwen3-8b
    shape, ctx 1024: batch 8 -> 8 splits, 32 -> 2, >= 64 -> 1, each the measured best.)"""
    ratio = 4 * sms // max(1, programs)
    return 1 if ratio < 2 else min(16, 1 << (ratio.bit_length() - 1))


def _lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None


def model_spec(name: str) -> ModelSpec:
    return _lookup(MODELS, name, "model")


def hardware_spec(name: str) -> HardwareSpec:
    return _lookup(HARDWARE, name, "hardware")
