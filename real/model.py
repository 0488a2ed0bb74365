"""Qwen3 (and Qwen2/Llama-shaped) decoder with the math of HF transformers, over a paged KV cache.

Tokens are packed ([T], no batch dim) as in nano-vllm. Each decoder layer splits into two halves that
can be called on their own, `attention_half` and `ffn_half`, so a micro-batch's attention can run on
one SM partition while another micro-batch's FFN runs on the other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from real import triton_kernels as tk
from real.attention import TorchAttention, make_backend
from real.context import AttnMetadata
from real.model_config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in fp32, cast back, then the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual  # HF adds in the model dtype, then norms the sum
    return rms_norm(x, weight, eps), x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def qk_norm_rope(positions, q, k, q_weight, k_weight, eps: float, cos_sin):
    """Qwen3's per-head q/k RMSNorm then RoPE: one fused kernel on CUDA instead of a dozen."""
    return rope(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos_sin)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)



class Fused:
    """The elementwise pieces, fused on CUDA (each eager op is a kernel launch, and a decode step of small ops
    is launch-bound): by hand-written Triton kernels (real/triton_kernels.py) where there is one, else by
    torch.compile; eager on CPU, where they must match HF bit for bit."""
    enabled = True
    in_graph = False  # set by real/graphs.py around graph warm-up and capture
    eager_min_tokens = 4096  # eager steps of at least this many tokens use the fusions too
    kernels = "triton"  # one of real.config.FUSED_KERNELS: set from EngineConfig.fused_kernels by the runner
    _compiled: dict = {}

    @classmethod
    def get(cls, fn, x: torch.Tensor):
        """Fused while a CUDA graph is being captured, and in eager steps of >= eager_min_tokens tokens:
        a compiled call costs 100-200 us of host time (guards, dynamic shapes), which a graph replay hides
        but an eager prefill pays per layer (a 28-layer prefill measured 25 ms of host time on H200,
        whatever its length); a long prefill's GPU time hides it, and there the unfused ops cost more
        GPU time than that (a dozen passes over [tokens, hidden] per norm and RoPE, each layer).
        A Triton launch costs ~10-20 us of host time, less than the ~12 eager ops (~5 us each) of a norm,
        so the Triton kernels would likely pay in short eager steps too; not measured yet, so the threshold
        stays as it was for both kinds (and eager GPU steps keep eager's numerics)."""
        if not (cls.enabled and x.is_cuda and (cls.in_graph or x.shape[0] >= cls.eager_min_tokens)):
            return fn
        if cls.kernels == "triton" and tk.triton is not None and fn in _TRITON:
            return _TRITON[fn]
        key = (fn, x.device.index)  # one compiled function per GPU: dp runs a model on each
        c = cls._compiled.get(key)
        if c is None:
            _raise_recompile_limit()
            c = cls._compiled[key] = torch.compile(fn, dynamic=True)
        return c


# the hand-written kernels, with the signatures and results of the functions they replace (rope alone has none)
_TRITON = {rms_norm: tk.rms_norm_triton, add_rms_norm: tk.add_rms_norm_triton, silu_mul: tk.silu_mul_triton,
           qk_norm_rope: tk.qk_norm_rope_triton}


def _raise_recompile_limit(limit: int = 256) -> None:
    """The pipelined-step graphs call each fusion on micro-batch views at many storage offsets, and dynamo
    guards on the offset: past its default limit of 8 compilations a function silently runs eagerly (its
    unfused ops captured into the remaining pipeline graphs; seen on 2x H100, 2026-11-26)."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name) and getattr(dynamo, name) < limit:
            setattr(dynamo, name, limit)


class RMSNorm(nn.Module):
    """HF's RMSNorm; optionally adds the residual first (returning the sum as the new residual)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return Fused.get(rms_norm, x)(x, self.weight, self.eps)
        return Fused.get(add_rms_norm, x)(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """RoPE with a cos/sin table built the way HF builds it (fp32, positions * inv_freq)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos_sin", self._table(None), persistent=False)

    def _table(self, device) -> torch.Tensor:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
                                         / self.head_dim))
        freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq[None, :]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_positions, head_dim]

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the table; rebuild it in fp32 on whatever device it moved to
        super()._apply(fn, recurse)
        self.cos_sin = self._table(self.cos_sin.device)
        return self

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return Fused.get(rope, q)(positions, q, k, self.cos_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # same products and sums as HF's x * cos + rotate_half(x) * sin
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PagedAttention(nn.Module):
    """Stores this layer's new K/V into its cache views, then attends through the backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: TorchAttention):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)  # set by Qwen3ForCausalLM.set_kv_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        if self.k_cache.numel():
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill and meta.prefill_tiles is not None:  # a prefill graph's paged kind
            return self.backend.paged_prefill(q, self.k_cache, self.v_cache, meta, self.scale)
        if meta.is_prefill:
            return self.backend.prefill(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        if not self.k_cache.numel():
            raise RuntimeError("decode needs a KV cache: call set_kv_cache first")
        return self.backend.decode(q, self.k_cache, self.v_cache, meta, self.scale)


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: TorchAttention):
        super().__init__()
        self.q_size, self.kv_size, self.head_dim = config.q_size, config.kv_size, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.rotary = [rotary]  # a list: shared by every layer, not registered once per layer
        self.attn = PagedAttention(config.num_attention_heads, config.num_key_value_heads, config.head_dim, backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (-1, self.head_dim))
        k = k.unflatten(-1, (-1, self.head_dim))
        v = v.unflatten(-1, (-1, self.head_dim))
        if hasattr(self, "q_norm"):
            q, k = Fused.get(qk_norm_rope, q)(positions, q, k, self.q_norm.weight, self.k_norm.weight,
                                              self.q_norm.eps, self.rotary[0].cos_sin)
        else:
            q, k = self.rotary[0](positions, q, k)
        o = self.attn(q, k, v, meta)
        return self.o_proj(o.flatten(-2))


class Qwen3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(Fused.get(silu_mul, gate_up)(gate_up))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, backend: TorchAttention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def attention_half(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                       meta: AttnMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Input norm (adding the residual the previous layer left), attention, o_proj."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(positions, hidden, meta), residual

    def ffn_half(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-attention norm (adding the residual), gate_up, SiLU*mul, down."""
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward(self, positions, hidden, residual, meta):
        hidden, residual = self.attention_half(positions, hidden, residual, meta)
        return self.ffn_half(hidden, residual)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: str | TorchAttention = "torch"):
        super().__init__()
        self.config = config
        self.backend = make_backend(backend) if isinstance(backend, str) else backend
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, self.rotary, self.backend)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions [T] (packed) -> final-normed hidden states [T, hidden]."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (only the rows that sample) -> fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def set_kv_cache(self, kv: torch.Tensor) -> None:
        """kv [2, layers, blocks, block_size, kv_heads, head_dim]: each layer gets views of its K and V."""
        c = self.config
        if kv.dim() != 6 or kv.shape[0] != 2 or kv.shape[1] != c.num_hidden_layers or \
                tuple(kv.shape[4:]) != (c.num_key_value_heads, c.head_dim):
            raise ValueError(f"kv cache shape {tuple(kv.shape)} is not [2, {c.num_hidden_layers}, blocks, "
                             f"block_size, {c.num_key_value_heads}, {c.head_dim}]")
        for i, layer in enumerate(self.layers):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = kv[0, i], kv[1, i]
