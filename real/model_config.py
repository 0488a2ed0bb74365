"""The model's shape as the engine needs it, read from a ModelSpec preset or a Hugging Face config.json.

One dataclass for the Qwen3 family and its close relatives (Qwen2, Llama): they differ only in
whether the q/k/v projections carry a bias and whether q/k are RMS-normed per head.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from policies.specs import ModelSpec

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


@dataclass(slots=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2: True; Qwen3: False)
    o_proj_bias: bool = False  # bias on o_proj too (Qwen3/Llama with attention_bias; never Qwen2)
    qk_norm: bool = True  # per-head RMSNorm of q and k before RoPE (Qwen3 only)
    eos_token_id: int | None = None
    name: str = "qwen3"
    model_type: str = "qwen3"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: {self.num_attention_heads} query heads do not split into "
                             f"{self.num_key_value_heads} KV heads")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelConfig:
        """A Qwen3 of the preset's shape (random weights; the presets carry no EOS)."""
        return cls(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                   num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                   num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size,
                   max_position_embeddings=spec.max_position, rms_norm_eps=spec.rms_norm_eps,
                   rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_embeddings, name=spec.name)

    @classmethod
    def from_hf_dict(cls, hf: dict, name: str | None = None) -> ModelConfig:
        """From the keys of a config.json; refuses what the model code would compute wrongly."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE)")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):  # Llama 3 lists several; the engine stops on one
            eos = eos[0] if eos else None
        # HF Qwen2 always biases q/k/v (never o_proj); Qwen3 and Llama bias all four when attention_bias
        bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        return cls(hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 4096),
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   attention_bias=bias, o_proj_bias=bias and model_type != "qwen2",
                   qk_norm=model_type == "qwen3", eos_token_id=eos, name=name or model_type,
                   model_type=model_type)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> ModelConfig:
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {ckpt_dir}")
        return cls.from_hf_dict(json.loads(path.read_text()), name=Path(ckpt_dir).name)

    def to_hf_config(self):
        """The matching transformers config (for tests that compare against HF's model)."""
        import transformers

        if self.o_proj_bias != (self.attention_bias and self.model_type != "qwen2"):
            raise ValueError(f"{self.model_type}: o_proj_bias={self.o_proj_bias} has no HF twin")
        common = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                      num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                      vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
                      rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
                      rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                      eos_token_id=self.eos_token_id, hidden_act="silu")
        if self.model_type == "qwen3":
            return transformers.Qwen3Config(attention_bias=self.attention_bias, **common)
        if self.model_type == "qwen2":
            if not self.attention_bias:
                raise ValueError("HF Qwen2 always biases q/k/v; attention_bias=False has no HF twin")
            return transformers.Qwen2Config(**common)
        return transformers.LlamaConfig(attention_bias=self.attention_bias, **common)
