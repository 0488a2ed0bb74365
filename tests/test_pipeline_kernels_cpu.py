"""Kernels sized for the SM partition they run on, and bench/pipeline_diag.py's ceilings (CPU: no partitions)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from policies.specs import decode_context_splits
from real.attention import SmBudget, TritonAttention
from real.pipeline import PartitionKernels, on_partition

ROOT = Path(__file__).resolve().parents[1]


def _diag():
    spec = importlib.util.spec_from_file_location("pipeline_diag", ROOT / "bench/pipeline_diag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_attention_splits_follow_the_partition_budget():
    backend, gpu = TritonAttention(), torch.device("cuda", 0)  # a device object: no CUDA call is made
    try:
        SmBudget.sms = 36
        assert backend.num_splits(64, gpu) == decode_context_splits(64, 36) == 2
        SmBudget.sms = 132
        assert backend.num_splits(64, gpu) == decode_context_splits(64, 132) == 8
    finally:
        SmBudget.sms = None


def test_on_partition_without_a_stream_changes_nothing():
    assert not PartitionKernels.attention_splits and not PartitionKernels.gemm_carveout  # the engine's defaults
    with on_partition(None, 36, 132):
        assert SmBudget.sms is None
    assert SmBudget.sms is None


def test_on_partition_sizes_attention_for_the_partition_only_when_asked(monkeypatch):
    import contextlib

    from real import pipeline

    monkeypatch.setattr(pipeline.torch.cuda, "stream", lambda s: contextlib.nullcontext())  # no CUDA here
    stream = object()  # stands in for a partition's stream
    with on_partition(stream, 36, 132):
        assert SmBudget.sms is None  # off by default: the whole GPU's splits
    monkeypatch.setattr(PartitionKernels, "attention_splits", True)
    with on_partition(stream, 36, 132):
        assert SmBudget.sms == 36
    assert SmBudget.sms is None


def test_diag_engine_variant_is_the_engines_default():
    diag = _diag()
    splits, carveout, blas = diag.VARIANTS[diag.ENGINE]
    assert (splits, carveout, blas) == (PartitionKernels.attention_splits, PartitionKernels.gemm_carveout, None)


def test_summarize_ceilings_and_captured_share():
    diag = _diag()
    row = dict(seq_step_ms=10.0, pipeline_step_ms={diag.ENGINE: {"96:36": 12.5, "64:68": 8.0}},
               layer={"seq_ms": 0.30, diag.ENGINE: {
                   "96:36": dict(pair_half_ms=0.125, pair_full_ms=0.20),
                   "64:68": dict(pair_half_ms=0.14, pair_full_ms=0.25)}})
    s = diag.summarize(row)
    assert s["best_split"] == "64:68" and s["speedup"] == pytest.approx(1.25)
    assert s["ceiling_like_for_like"] == pytest.approx(0.30 / 0.25) and s["ceiling_like_for_like_split"] == "96:36"
    assert s["ceiling_facts_file"] == pytest.approx(1.5)
    assert s["captured_like_for_like"] == pytest.approx(0.25 / 0.2)
    assert s["captured_facts_file"] == pytest.approx(0.5)
    assert s["pipeline_over_ideal"] == pytest.approx(1.25 / 1.2)
    row["layer"]["seq_ms"] = 0.2  # both ceilings at or under 1.01: no gain to capture, no captured share
    s = diag.summarize(row)
    assert "captured_like_for_like" not in s and "captured_facts_file" not in s
    assert s["ceiling_like_for_like"] == pytest.approx(0.8)


def test_tail_ab_places_the_long_context_where_asked():
    """--tail-place: the decode_tail rows' mix (every 8th long), or one long sequence first or last, which decides
    the micro-batch that streams it once a pipelined graph halves the padded batch (33 -> 24 + 9)."""
    from traces.profile import placed_tail_contexts

    assert placed_tail_contexts(16, 8192) == [1024] * 7 + [8192] + [1024] * 7 + [8192]
    assert placed_tail_contexts(33, 8192, "first") == [8192] + [1024] * 32
    assert placed_tail_contexts(33, 5120, "last") == [1024] * 32 + [5120]
    with pytest.raises(ValueError, match="every8, first or last"):
        placed_tail_contexts(8, 8192, "middle")
    assert "placed_tail_contexts" in _diag().tail_ab.__doc__  # the script's contexts are these
