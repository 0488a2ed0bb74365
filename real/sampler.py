"""Greedy and temperature sampling in one pass (Gumbel-max), seeded for reproducible runs."""
from __future__ import annotations

import os
import random

import torch


def sampler_kind(device: torch.device) -> str:
    """`REAL_SAMPLER=torch|triton` (default: triton on CUDA when importable, torch otherwise)."""
    from .triton_kernels import triton

    want = os.environ.get("REAL_SAMPLER", "").strip().lower() or "auto"
    if want not in ("auto", "torch", "triton"):
        raise ValueError(f"REAL_SAMPLER must be torch or triton, got {want!r}")
    usable = triton is not None and device.type == "cuda"
    if want == "triton" and not usable:
        raise RuntimeError("REAL_SAMPLER=triton needs a CUDA device and the triton package")
    return "triton" if (want == "triton" or (want == "auto" and usable)) else "torch"


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.kind = sampler_kind(device)
        self._seeds = random.Random(seed)  # the fused kernel's Philox seed per call, drawn on the host (no sync)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
        """logits [N, V] fp32, one temperature per row (0 = greedy) -> token ids [N] int64."""
        if not any(t > 0 for t in temperatures):
            return logits.argmax(dim=-1)
        first = temperatures[0]
        same = all(t == first for t in temperatures)  # the common case: no per-row tensor to copy over
        from .runner import to_device

        if self.kind == "triton":
            from .triton_kernels import sample_triton

            per_row = None if same else to_device(temperatures, torch.float32, logits.device)
            return sample_triton(logits, first if same else None, per_row, self._seeds.randrange(2 ** 31))
        u = torch.rand(logits.shape, generator=self.generator, device=logits.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        if same:
            return (logits / first + gumbel).argmax(dim=-1)
        t = to_device(temperatures, torch.float32, logits.device)
        sampled = (logits / t.clamp_min(1e-5).unsqueeze(1) + gumbel).argmax(dim=-1)
        return torch.where(t > 0, sampled, logits.argmax(dim=-1))
