"""Prefill CUDA graphs replay padded batches: on CPU, the padded forward (the graph's body) must give the
unpadded forward's hidden states on the sampled rows and store the same KV."""
from __future__ import annotations

import pytest
import torch

from real.context import AttnMetadata
from real.graphs import padded_prefill


@pytest.fixture(scope="module")
def runner():
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model_config import ModelConfig
    from real.runner import ModelRunner

    cfg = EngineConfig(model="tiny", device="cpu", num_kv_blocks=64, max_model_len=256)
    return ModelRunner(cfg, ModelConfig.from_spec(model_spec("tiny")), torch.device("cpu"), None)


def test_padded_batch_matches_unpadded(runner):
    from real.profile import prefill_batch

    batch = prefill_batch(runner, [37, 5, 80])
    r_partial = batch.prefill[1][0]
    r_partial.prefill_target = 50  # a first chunk of a longer prompt: runs, samples nothing
    with torch.inference_mode():
        ids, pos, meta, rows = runner.prepare_prefill(batch.prefill)
        ref = runner.model(ids, pos, meta)[torch.as_tensor(rows)]
        ref_cache = runner.kv_cache.clone()
        runner.kv_cache.zero_()
        pids, ppos, slots, cu, prow, sampled = padded_prefill(batch.prefill, 256, 8, runner.block_size)
        assert sampled == 2 and list(cu[4:]) == [122] * 5 and (slots[122:] == -1).all()
        pmeta = AttnMetadata(is_prefill=True, slot_mapping=torch.as_tensor(slots), cu_seqlens_q=torch.as_tensor(cu),
                             cu_seqlens_k=torch.as_tensor(cu), cu_seqlens_q_host=cu.tolist(),
                             cu_seqlens_k_host=cu.tolist(), max_seqlen_q=256, max_seqlen_k=256)
        out = runner.model(torch.as_tensor(pids), torch.as_tensor(ppos), pmeta)[torch.as_tensor(prow[:sampled])]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.kv_cache, ref_cache, rtol=1e-5, atol=1e-5)


def test_fits_rejects_prefix_and_overflow():
    from policies.request import Request
    from real.graphs import PrefillGraphs

    g = PrefillGraphs.__new__(PrefillGraphs)
    g.max_seqs, g.buckets, g.graphs = 2, [256, 512], {(256, False): object(), (512, False): object()}
    g.table_width = 20
    def req(n, prefilled=0):
        r = Request(0, 0.0, n, 1)
        r.prefilled = prefilled
        return r
    assert g.fits([(req(100), 100), (req(150), 150)]) == (256, False)
    assert g.fits([(req(300), 300)]) == (512, False)
    assert g.fits([(req(600), 600)]) is None  # too many tokens
    assert g.fits([(req(10), 10)] * 3) is None  # too many sequences
    assert g.fits([(req(200, prefilled=16), 100)]) is None  # a cached prefix without the paged kind: eager
    g.graphs[256, True] = object()
    assert g.fits([(req(400, prefilled=16), 100)]) == (256, True)
    assert g.fits([(req(200, prefilled=16), 100), (req(50), 50)]) == (256, True)
    assert g.fits([(req(400, prefilled=16), 300)]) is None  # the paged kind has no 512 bucket here
    too_long = req(400, prefilled=300)
    too_long.blocks = list(range(21))  # more blocks than the graph's table holds: eager
    assert g.fits([(too_long, 100)]) is None


class _Replay:
    """Stands in for a captured graph on CPU: replaying runs the graph's body on the staged inputs."""

    def __init__(self, graphs, bucket, paged):
        self.replay = lambda: graphs._forward(bucket, paged)


@pytest.mark.parametrize("paged", [False, True])
def test_graph_body_matches_eager_prefill_with_and_without_prefix(runner, paged):
    """What a prefill graph replays (padded inputs staged as PrefillGraphs.run stages them; the paged kind
    with block tables, context lengths and the kernel's work list, attention read from the cache) gives the
    eager prefill's sampled hidden states and KV, for chunks after a cached prefix and first chunks."""
    from policies.scheduler import Batch
    from real.graphs import PrefillGraphs
    from real.profile import prefill_batch

    with torch.inference_mode():
        prompts = prefill_batch(runner, [100, 32])  # two prompts whose first chunks (60, 23) are cached first
        long, short = (r for r, _ in prompts.prefill)
        runner.run(Batch("gpu0", prefill=[(long, 60), (short, 23)]), {})
        long.prefilled, short.prefilled = 60, 23
        batch = prefill_batch(runner, [31])  # and a new prompt beside them, on blocks of its own
        fresh = batch.prefill[0][0]
        fresh.blocks = [b + 40 for b in fresh.blocks]
        chunks = [(long, 40), (fresh, 31), (short, 9)] if paged else [(fresh, 31)]
        cache_before = runner.kv_cache.clone()
        ids, pos, meta, rows = runner.prepare_prefill(chunks)
        ref = runner.model(ids, pos, meta)[torch.as_tensor(rows)]
        ref_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(cache_before)
        g = PrefillGraphs(runner.model, 256, 8, runner.block_size, runner.model_cfg.hidden_size, torch.float32,
                          torch.device("cpu"), runner.max_blocks_per_seq, paged=True)
        g.graphs = {(256, p): _Replay(g, 256, p) for p in (False, True)}
        key = g.fits(chunks)
        assert key == (256, paged)
        out = g.run(chunks, key)
    assert out.shape[0] == len(rows) == 3 if paged else 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.kv_cache, ref_cache, rtol=1e-5, atol=1e-5)


def test_prefill_graphs_capture_with_the_compiled_fusions(runner, monkeypatch):
    """Every prefill graph is captured with Fused.in_graph set, as the decode graphs are: the fusions are then
    compiled for every bucket, not only for those of >= Fused.eager_min_tokens tokens (CPU: capture_graph
    replaced by a recorder)."""
    import real.graphs as graphs
    from real.graphs import PrefillGraphs
    from real.model import Fused

    seen = []

    def record(fn, pool, stream):
        seen.append(Fused.in_graph)
        return type("G", (), {"pool": lambda self: None})()

    monkeypatch.setattr(graphs, "capture_graph", record)
    g = PrefillGraphs(runner.model, 1024, 4, runner.block_size, runner.model_cfg.hidden_size, torch.float32,
                      torch.device("cpu"), runner.max_blocks_per_seq, paged=True)
    g.capture()
    assert seen == [True] * 6 and not Fused.in_graph  # buckets 256, 512, 1024, plain and paged; flag restored
