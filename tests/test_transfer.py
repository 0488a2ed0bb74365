"""The KV transport: exactly the request's blocks land in the reserved blocks, whatever the chunking."""
from __future__ import annotations

import pytest
import torch

from policies.request import Request
from real.transfer import BlockCopyTransport


def caches(device_src="cpu", device_dst="cpu", layers=5, blocks=40):
    g = torch.Generator().manual_seed(0)
    src = torch.randn((2, layers, blocks, 4, 2, 8), generator=g).to(device_src)
    dst = torch.zeros((2, layers, blocks + 7, 4, 2, 8), device=device_dst)
    return src, dst


def request(blocks, dst_blocks, rid=1):
    r = Request(rid, 0.0, len(blocks) * 4, 1)
    r.blocks, r.dst_blocks = blocks, dst_blocks
    return r


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30])  # one group per layer, a few groups, one group
def test_copies_exactly_the_blocks(chunk_bytes):
    src, dst = caches()
    t = BlockCopyTransport(src, dst, chunk_bytes=chunk_bytes)
    blocks, dst_blocks = [17, 3, 29, 8, 11], [40, 2, 5, 33, 21, 9]  # one extra reserved block on the decode side
    t.start(request(blocks, dst_blocks))
    done = t.poll()
    assert len(done) == 1 and done[0].ok and done[0].kv_bytes == len(blocks) * t.block_bytes
    assert torch.equal(dst[:, :, dst_blocks[:5]], src[:, :, blocks])
    untouched = [b for b in range(dst.shape[2]) if b not in dst_blocks[:5]]
    assert dst[:, :, untouched].abs().sum() == 0


def test_layer_groups_cover_every_layer_once():
    src, dst = caches(layers=7)
    t = BlockCopyTransport(src, dst, chunk_bytes=t_bytes(src) * 2)
    for n in (1, 2, 5, 13, 40):
        groups = t.layer_groups(n)
        assert [l for a, b in groups for l in range(a, b)] == list(range(7))
        assert len(groups) == max(1, min(7, n // 2))


def t_bytes(src):
    return src[:, :, 0].numel() * src.element_size()


def test_injected_failure_is_reported_not_copied():
    src, dst = caches()
    t = BlockCopyTransport(src, dst, faults={1: 1})
    t.start(request([1, 2], [3, 4]))
    done = t.poll()
    assert not done[0].ok and "injected" in done[0].reason and dst.abs().sum() == 0
    t.start(request([1, 2], [3, 4]))  # the retry goes through
    assert t.poll()[0].ok and torch.equal(dst[:, :, [3, 4]], src[:, :, [1, 2]])


def test_transport_modes_are_checked():
    src, dst = caches()
    assert BlockCopyTransport(src, dst).mode == "copy"  # auto on CPU
    with pytest.raises(ValueError, match="unknown KV transport mode"):
        BlockCopyTransport(src, dst, mode="nccl")
    for mode in ("push", "pull"):
        with pytest.raises(RuntimeError, match="peer access"):
            BlockCopyTransport(src, dst, mode=mode)


def test_none_mode_is_a_timing_control_that_moves_nothing():
    src, dst = caches()
    t = BlockCopyTransport(src, dst, mode="none")
    t.start(request([1, 2], [3, 4]))
    done = t.poll()
    assert t.mode == "none" and len(done) == 1 and done[0].ok and done[0].kv_bytes == 2 * t.block_bytes
    assert dst.abs().sum() == 0 and not t.in_flight


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode,max_programs", [("copy", 0), ("push", 0), ("push", 7), ("pull", 0), ("pull", 7)])
def test_peer_copy_between_gpus(mode, max_programs):
    src, dst = caches("cuda:0", "cuda:1", layers=28, blocks=400)
    t = BlockCopyTransport(src, dst, chunk_bytes=1 << 16, mode=mode, max_programs=max_programs)
    assert t.mode == mode
    dst.zero_()  # the warm-up copied block 0; and a push from GPU0 is not ordered after GPU1's work
    torch.cuda.synchronize("cuda:1")
    blocks = list(range(399, 0, -3))
    dst_blocks = list(range(len(blocks) + 1))
    t.start(request(blocks, dst_blocks))
    done = []
    while not done:
        done = t.poll()
    assert done[0].ok and torch.equal(dst[:, :, dst_blocks[:-1]].cpu(), src[:, :, blocks].cpu())
