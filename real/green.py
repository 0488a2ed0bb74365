"""SM partitions for GPU1: one pair of disjoint green contexts (attention, FFN) per allowed split.

Created once at start-up and kept alive with their streams (a destroyed context kills its streams).
Each split comes from ONE split call, cuDevSmResourceSplitByCount(n) -> (n SMs, remainder), so the
two partitions cannot overlap (two separate creates can: ../shared/notes/hardware-facts.md).
On CPU there are no partitions: every split maps to (None, None) and the pipeline runs sequentially.
Any failure raises GreenContextUnavailable with the reason; the engine then reports the capability
missing and the fallback controller runs pd.
"""
from __future__ import annotations

import torch


class GreenContextUnavailable(RuntimeError):
    pass


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise GreenContextUnavailable(f"CUDA driver error {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


class SmPartitions:
    def __init__(self, device: torch.device, splits: list[tuple[int, int]]):
        self.device = device
        self.streams: dict[tuple[int, int], tuple] = {}
        self._keep = []  # green contexts must outlive their streams
        if device.type != "cuda":
            self.streams = {s: (None, None) for s in splits}
            return
        try:
            from cuda.bindings import driver as cu
        except ImportError as e:
            raise GreenContextUnavailable(f"cuda-bindings not importable ({e})") from None
        try:
            _check(cu.cuInit(0))
            dev = _check(cu.cuDeviceGet(device.index or 0))
            whole = _check(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
            for attn_sms, ffn_sms in splits:
                groups, _, rest = _check(cu.cuDevSmResourceSplitByCount(1, whole, 0, attn_sms))
                pair = []
                for part in (groups[0] if isinstance(groups, (list, tuple)) else groups, rest):
                    desc = _check(cu.cuDevResourceGenerateDesc([part], 1))
                    ctx = _check(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
                    stream = _check(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
                    self._keep.append(ctx)
                    pair.append(torch.cuda.ExternalStream(int(stream), device=device))
                self.streams[(attn_sms, ffn_sms)] = tuple(pair)
        except GreenContextUnavailable:
            raise
        except Exception as e:  # driver or binding differences: fall back, with the reason
            raise GreenContextUnavailable(f"{type(e).__name__}: {e}") from None

    def get(self, split: tuple[int, int]) -> tuple:
        return self.streams.get(split, (None, None))
