"""real/profile.py's row builders on CPU (tiny Qwen3): the rows they write must be valid profile rows of the
shapes they name. Timings on CPU mean nothing; the GPU run is `python -m real.profile`."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from traces.profile import ProfileError, read_profile, tail_mix_contexts, write_profile  # noqa: E402

META = dict(gpu="cpu", date="2026-11-27", command="test", model="tiny", hardware="h200x2", torch="cpu", sms=132)


@pytest.fixture(scope="module")
def runner():
    from policies.specs import model_spec
    from real.config import EngineConfig
    from real.model_config import ModelConfig
    from real.runner import ModelRunner

    cfg = EngineConfig(model="tiny", device="cpu", num_kv_blocks=160, max_model_len=256, max_num_seqs=64)
    return ModelRunner(cfg, ModelConfig.from_spec(model_spec("tiny")), torch.device("cpu"), None)


def test_tail_mix_puts_a_long_sequence_in_each_half():
    mix = tail_mix_contexts(16, 8192)
    assert mix.count(8192) == 2 and mix.count(1024) == 14
    assert 8192 in mix[:8] and 8192 in mix[8:]  # each of the pipeline's contiguous micro-batches


def test_decode_tail_rows_are_valid_rows_at_the_shapes_that_fit(runner, tmp_path):
    from real.profile import decode_tail_rows

    with torch.inference_mode():  # batch 64 needs 64 x 32 + 8 x 128 tokens = 176 blocks: more than the cache's 160
        rows = decode_tail_rows(runner, torch.device("cpu"), reps=1, splits=[], max_batch=64, batches=(8, 16, 64),
                                longs=(128, 96), short=32)
    assert [(r["batch"], r["context"], r["attn_sms"], r["microbatches"]) for r in rows] == [
        (8, 128, 0, 1), (16, 128, 0, 1), (8, 96, 0, 1), (16, 96, 0, 1)]
    rows = [{**r, "seconds": 1e-4} for r in rows]  # CPU timings mean nothing (their difference may take any sign)
    rows[0]["seconds"] = -1e-4  # a difference of two timings: noise may make it negative, and the profile allows it
    df, _ = read_profile(write_profile(tmp_path / "p.csv", rows, META))
    assert list(df["op"]) == ["decode_tail"] * 4 and (df["seconds"] < 0).sum() == 1
    with pytest.raises(ProfileError, match="more than 0 seconds"):  # a step itself may not
        write_profile(tmp_path / "bad.csv", [{**rows[0], "op": "decode"}], META)
