"""Greedy and temperature sampling in one pass (Gumbel-max), seeded for reproducible runs."""
from __future__ import annotations

import torch


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
        """logits [N, V] fp32, one temperature per row (0 = greedy) -> token ids [N] int64."""
        if not any(t > 0 for t in temperatures):
            return logits.argmax(dim=-1)
        u = torch.rand(logits.shape, generator=self.generator, device=logits.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        first = temperatures[0]
        if all(t == first for t in temperatures):  # the common case: no per-row tensor to copy over
            return (logits / first + gumbel).argmax(dim=-1)
        from .runner import to_device

        t = to_device(temperatures, torch.float32, logits.device)
        sampled = (logits / t.clamp_min(1e-5).unsqueeze(1) + gumbel).argmax(dim=-1)
        return torch.where(t > 0, sampled, logits.argmax(dim=-1))
