"""Weights in and out of our fused layout: seeded random init, HF safetensors loading, HF export.

Our parameter names are HF's without the "model." prefix, except the two fused projections:
qkv_proj = [q_proj; k_proj; v_proj] and gate_up_proj = [gate_proj; up_proj] (stacked on dim 0).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from real.model import Qwen3ForCausalLM, RMSNorm

INIT_STD = 0.02  # HF's initializer_range
_CHUNK_ELEMENTS = 1 << 26  # draw big matrices in pieces: bounded fp32 scratch on the GPU


def _fused_parts(model: Qwen3ForCausalLM) -> dict[str, tuple[tuple[str, int], ...]]:
    """Fused module name -> (HF module name, rows) of each stacked part."""
    c = model.config
    return {"qkv_proj": (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)),
            "gate_up_proj": (("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size))}


def hf_parts(model: Qwen3ForCausalLM, name: str) -> list[tuple[str, int | None]]:
    """Our parameter name -> [(HF tensor name, rows or None if unfused)]."""
    prefix = "" if name.startswith("lm_head.") else "model."
    module, _, leaf = name.rpartition(".")
    parent, _, last = module.rpartition(".")
    fused = _fused_parts(model)
    if last in fused:
        return [(f"{prefix}{parent}.{part}.{leaf}", rows) for part, rows in fused[last]]
    return [(prefix + name, None)]


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """HF-style random init, reproducible for a seed on a given device: Linear/Embedding ~ N(0, 0.02)
    drawn in fp32 then cast, biases 0, norms 1. A generator on the parameters' device keeps big
    models fast to initialise on the GPU."""
    generators: dict[torch.device, torch.Generator] = {}
    seen: set[int] = set()  # a tied lm_head is the embedding: draw it once
    for module in model.modules():
        w = getattr(module, "weight", None)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        if isinstance(module, RMSNorm):
            w.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            gen = generators.setdefault(w.device, torch.Generator(device=w.device).manual_seed(seed))
            rows = max(1, _CHUNK_ELEMENTS // max(1, w[0].numel()))
            for start in range(0, w.shape[0], rows):
                piece = w[start:start + rows]
                draw = torch.empty(piece.shape, dtype=torch.float32, device=w.device)
                piece.copy_(draw.normal_(0.0, INIT_STD, generator=gen))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


@torch.no_grad()
def load_checkpoint(model: Qwen3ForCausalLM, ckpt_dir: str | Path) -> Qwen3ForCausalLM:
    """Copy a HF checkpoint (*.safetensors, sharded or not) into the fused parameters."""
    from safetensors import safe_open

    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {ckpt_dir}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name == "lm_head.weight" and "lm_head.weight" not in where:
            param.copy_(_read(where, "model.embed_tokens.weight", param.shape, files))  # tied in the file
            continue
        parts = [_read(where, hf_name, (rows, *param.shape[1:]) if rows else param.shape, files)
                 for hf_name, rows in hf_parts(model, name)]
        param.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
    return model


def _read(where: dict, hf_name: str, shape, files) -> torch.Tensor:
    if hf_name not in where:
        raise KeyError(f"checkpoint tensor {hf_name!r} is missing (looked in {len(files)} safetensors "
                       f"file(s): {', '.join(f.name for f in files)})")
    t = where[hf_name].get_tensor(hf_name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(t.shape)}, the model expects "
                         f"{tuple(shape)}: is config.json the checkpoint's own?")
    return t


@torch.no_grad()
def export_hf_state_dict(model: Qwen3ForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under HF's unfused names (own storage each, so safetensors can save them)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        parts = hf_parts(model, name)
        pieces = param.split([rows for _, rows in parts]) if len(parts) > 1 else [param]
        for (hf_name, _), piece in zip(parts, pieces):
            out[hf_name] = piece.detach().clone()
    if model.config.tie_word_embeddings:  # HF's tied model still lists it; a copy keeps safetensors happy
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out
