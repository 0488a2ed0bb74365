"""bench/colocated_at_shape.py: a colocated run's mixed steps with their chunks' cached prefixes rebuilt."""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import colocated_at_shape as cas  # noqa: E402


def test_chunks_are_rebuilt_as_the_scheduler_cuts_them():
    # request 0 (3,000 tokens) prefills over two steps; request 1 (500) joins the second step's budget
    requests = pd.DataFrame(dict(request_id=[0, 1], prompt_tokens=[3000, 500], prefill_start_s=[0.0, 0.01],
                                 prefill_end_s=[0.02, 0.02]))
    steps = pd.DataFrame(dict(t_start_s=[0.0, 0.01, 0.02], t_end_s=[0.01, 0.02, 0.03],
                              stage=["prefill", "mixed", "decode"], batch_size=[1, 5, 5], tokens=[2048, 1452 + 3, 5]))
    got = cas.rebuild_chunks(steps, requests)
    assert got == [[(2048, 0)], [(952, 2048), (500, 0)], None]


def test_a_step_whose_tokens_do_not_add_up_is_left_out():
    requests = pd.DataFrame(dict(request_id=[0], prompt_tokens=[100], prefill_start_s=[0.0], prefill_end_s=[0.01]))
    steps = pd.DataFrame(dict(t_start_s=[0.0], t_end_s=[0.01], stage=["mixed"], batch_size=[3], tokens=[500]))
    assert cas.rebuild_chunks(steps, requests) == [None]  # 498 chunk tokens, the prompt has 100


def test_cli_reads_a_colocated_run_against_a_profile(tmp_path):
    archive = tmp_path / "runs.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(ROOT / "tests/fixtures/run_single", arcname="fidelity_runs/single")
    out = tmp_path / "out.json"
    prof = str(ROOT / "traces/profiles/h200x2-qwen3-0.6b.csv")
    assert cas.main([str(archive), "--profile", prof, "--out", str(out)]) == 0
    got = json.loads(out.read_text())["profiles"][prof]
    assert got["decode"]["steps"] > 0 and got["decode"]["model_over_real"] > 0
    assert cas.main([str(tmp_path / "missing.tar.xz"), "--profile", prof, "--out", str(out)]) == 2
