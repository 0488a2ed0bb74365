"""Workload loaders, synthetic generator, transforms and CLI (traces/workload.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from traces.workload import (RequestSpec, Workload, WorkloadError, apply_max_context, first_n,
                             load_workload, make_workload, scale_rate, synthetic_workload, time_window)

REPO = Path(__file__).resolve().parents[1]
AZURE_REAL = Path(__file__).resolve().parents[2] / "shared/traces/AzureLLMInferenceTrace_conv.csv"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224671,879,55
"""
VIDUR = """arrived_at,num_prefill_tokens,num_decode_tokens,pd_ratio
10.5,100,20,5.0
11.0,200,40,5.0
13.25,300,60,5.0
"""
MOONCAKE = [
    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]},
    {"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46, 52]},
    {"timestamp": 30732, "input_length": 100, "output_length": 7, "hash_ids": []},
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def lengths(w: Workload) -> list[tuple[int, int]]:
    return [(r.prompt_tokens, r.output_tokens) for r in w.requests]


def make(arrivals, lens) -> Workload:
    return Workload([RequestSpec(i, a, p, o) for i, (a, (p, o)) in enumerate(zip(arrivals, lens))], "test", "synthetic")


# --- loaders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text,fmt,arrivals,lens", [
    ("a.txt", AZURE, "azure", [0.0, 4.314579, 4.5418771], [(374, 44), (396, 109), (879, 55)]),
    ("b.jsonl", VIDUR, "vidur", [0.0, 0.5, 2.75], [(100, 20), (200, 40), (300, 60)]),
    ("c.csv", jsonl(MOONCAKE), "mooncake", [0.0, 3.053, 3.25], [(6955, 52), (6472, 26), (100, 7)]),
])
def test_format_detected_by_content_and_rebased(tmp_path, name, text, fmt, arrivals, lens):
    # File names deliberately lie about the format.
    w = load_workload(write(tmp_path, name, text))
    assert w.format == fmt
    assert w.source == str(tmp_path / name)
    assert [r.request_id for r in w.requests] == [0, 1, 2]
    assert [r.arrival_s for r in w.requests] == pytest.approx(arrivals, abs=1e-9)
    assert lengths(w) == lens
    assert all(isinstance(r.prompt_tokens, int) and isinstance(r.output_tokens, int) for r in w.requests)
    assert w.skipped_rows == 0


def test_azure_keeps_sub_millisecond_precision(tmp_path):
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,1,1\n2023-11-16 18:15:46.6805901,1,1\n"
    w = load_workload(write(tmp_path, "t.csv", text))
    assert w.requests[1].arrival_s == pytest.approx(1e-7, abs=1e-10)


def test_blank_lines_and_bom_are_tolerated(tmp_path):
    text = "\ufeff" + AZURE.replace("\n2023-11-16 18:15:50", "\n\n2023-11-16 18:15:50") + "\n\n"
    w = load_workload(write(tmp_path, "t.csv", text))
    assert len(w.requests) == 3 and w.format == "azure"


@pytest.mark.parametrize("text,needle", [
    ("", "empty file"),
    ("\n  \n", "empty file"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ("a,b,c\n1,2,3\n", "unknown format"),
    ("[1, 2, 3]\n", "unknown format"),
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,1\n", "missing column(s) GeneratedTokens"),
    ("arrived_at,num_decode_tokens\n1,2\n", "missing column(s) num_prefill_tokens"),
    ('{"timestamp": 1, "input_length": 5}\n', "missing key(s) output_length"),
])
def test_file_level_errors_name_file(tmp_path, text, needle):
    path = write(tmp_path, "bad.csv", text)
    for skip in (False, True):  # file-level problems raise even when skipping rows
        with pytest.raises(WorkloadError) as e:
            load_workload(path, skip_bad_rows=skip)
        msg = str(e.value)
        assert str(path) in msg and needle in msg and "\n" not in msg


def test_unknown_format_lists_known_formats(tmp_path):
    with pytest.raises(WorkloadError, match="known formats: azure.*vidur.*mooncake"):
        load_workload(write(tmp_path, "x.csv", "foo,bar\n1,2\n"))


def test_missing_directory_and_binary_files(tmp_path):
    with pytest.raises(WorkloadError, match="not found"):
        load_workload(tmp_path / "nope.csv")
    with pytest.raises(WorkloadError, match="directory"):
        load_workload(tmp_path)
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(WorkloadError, match="UTF-8"):
        load_workload(binary)


H = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
OK1 = "2023-11-16 18:15:46.1,10,5\n"
OK2 = "2023-11-16 18:15:47.1,20,6\n"


@pytest.mark.parametrize("bad_row,needle", [
    ("2023-11-16 18:15:46.5,abc,5\n", "ContextTokens 'abc' is not a number"),
    ("2023-11-16 18:15:46.5,,5\n", "ContextTokens '' is not a number"),
    ("2023-11-16 18:15:46.5,0,5\n", "ContextTokens '0' must be >= 1"),
    ("2023-11-16 18:15:46.5,-3,5\n", "ContextTokens '-3' must be >= 1"),
    ("2023-11-16 18:15:46.5,12.5,5\n", "ContextTokens '12.5' is not a whole number"),
    ("2023-11-16 18:15:46.5,10,0\n", "GeneratedTokens '0' must be >= 1"),
    ("2023-11-16 18:15:46.5,10,nan\n", "GeneratedTokens 'nan' is not a number"),
    ("yesterday,10,5\n", "TIMESTAMP 'yesterday' cannot be parsed"),
    ("2023-11-16 18:15:45.0,10,5\n", "goes backwards"),
    ("2023-11-16 18:15:46.5,10\n", "has 2 fields, header has 3"),
])
def test_bad_row_names_file_and_line(tmp_path, bad_row, needle):
    # header = line 1, OK1 = line 2, bad row = line 3, OK2 = line 4
    path = write(tmp_path, "t.csv", H + OK1 + bad_row + OK2)
    with pytest.raises(WorkloadError) as e:
        load_workload(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 3: ") and needle in msg and "\n" not in msg
    w = load_workload(path, skip_bad_rows=True)
    assert w.skipped_rows == 1 and len(w.requests) == 2
    assert [r.request_id for r in w.requests] == [0, 1]
    assert lengths(w) == [(10, 5), (20, 6)]
    assert w.requests[1].arrival_s == pytest.approx(1.0)
    assert any("skipped 1 bad rows" in n and "line 3" in n for n in w.notes)


def test_backwards_message_names_the_later_row_and_the_earlier_one(tmp_path):
    path = write(tmp_path, "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n1,1,1\n5,1,1\n3,1,1\n")
    with pytest.raises(WorkloadError, match=r"line 4: arrived_at goes backwards: '3' is earlier than '5' on line 3"):
        load_workload(path)


def test_first_bad_row_in_file_order_is_reported(tmp_path):
    text = H + OK1 + "2023-11-16 18:15:46.2,10,5,9\n" + "2023-11-16 18:15:46.3,x,5\n" + "2023-11-16 18:15:40,1,1\n"
    path = write(tmp_path, "t.csv", text)
    with pytest.raises(WorkloadError, match=r": line 3: has 4 fields"):
        load_workload(path)
    assert load_workload(path, skip_bad_rows=True).skipped_rows == 3


def test_skip_counts_many_bad_rows_and_all_bad_raises(tmp_path):
    text = H + OK1 + "2023-11-16 18:15:45,1,1\n" * 3 + "2023-11-16 18:15:46.5,0,1\n" + OK2
    w = load_workload(write(tmp_path, "t.csv", text), skip_bad_rows=True)
    assert w.skipped_rows == 4 and len(w.requests) == 2
    with pytest.raises(WorkloadError, match="no valid requests"):
        load_workload(write(tmp_path, "u.csv", H + "x,1,1\nx,2,2\n"), skip_bad_rows=True)


def test_mooncake_bad_lines(tmp_path):
    rows = [jsonl(MOONCAKE[:1]), "{not json\n", '{"timestamp": 30000, "input_length": 5}\n',
            "[1]\n", '{"timestamp": 30100, "input_length": true, "output_length": 3}\n', jsonl(MOONCAKE[1:])]
    path = write(tmp_path, "m.jsonl", "".join(rows))
    with pytest.raises(WorkloadError, match=r"m\.jsonl: line 2: invalid JSON"):
        load_workload(path)
    w = load_workload(path, skip_bad_rows=True)
    assert w.format == "mooncake" and w.skipped_rows == 4 and len(w.requests) == 3


def test_no_raw_exceptions_on_garbage(tmp_path):
    for i, text in enumerate(['TIMESTAMP,ContextTokens,GeneratedTokens\n"unterminated,1,1\n',
                              "arrived_at,num_prefill_tokens,num_decode_tokens\n1e400,1e400,-inf\n",
                              '{"timestamp": "x", "input_length": null, "output_length": {}}\n',
                              "TIMESTAMP,ContextTokens,GeneratedTokens\n99999-99-99,1,1\n"]):
        path = write(tmp_path, f"g{i}", text)
        for skip in (False, True):
            with pytest.raises(WorkloadError):
                load_workload(path, skip_bad_rows=skip)


@pytest.mark.skipif(not AZURE_REAL.exists(), reason="../shared/traces not present")
def test_real_azure_conv_trace():
    w = load_workload(AZURE_REAL)
    assert w.format == "azure" and w.skipped_rows == 0
    assert len(w.requests) == 19366
    assert w.duration_s / 60 == pytest.approx(58.4, abs=0.1)
    assert w.rate_rps == pytest.approx(5.53, abs=0.01)
    assert np.mean([r.prompt_tokens for r in w.requests]) == pytest.approx(1155, abs=1)
    assert max(r.output_tokens for r in w.requests) == 1000


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_defaults_match_azure_conv():
    w = synthetic_workload(20_000)
    assert w.format == "synthetic" and w.source == "synthetic" and len(w.requests) == 20_000
    assert w.requests[0].arrival_s == 0.0
    arrivals = np.array([r.arrival_s for r in w.requests])
    assert (np.diff(arrivals) >= 0).all()
    assert w.rate_rps == pytest.approx(5.53, rel=0.05)
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1.09, rel=0.1)
    prompt = np.array([r.prompt_tokens for r in w.requests])
    output = np.array([r.output_tokens for r in w.requests])
    assert prompt.mean() == pytest.approx(1155, rel=0.1) and np.median(prompt) == pytest.approx(1020, rel=0.1)
    assert output.mean() == pytest.approx(211, rel=0.1) and np.median(output) == pytest.approx(129, rel=0.1)
    assert prompt.min() >= 1 and prompt.max() <= 14050 and output.min() >= 1 and output.max() <= 1000
    assert all(isinstance(r.prompt_tokens, int) for r in w.requests[:10])


def test_synthetic_is_deterministic_per_seed():
    a, b, c = synthetic_workload(500, seed=7), synthetic_workload(500, seed=7), synthetic_workload(500, seed=8)
    assert a.requests == b.requests
    assert a.requests != c.requests


def test_synthetic_poisson_rate_and_cv():
    w = synthetic_workload(20_000, arrival="poisson", rate_rps=10.0, seed=1)
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert w.rate_rps == pytest.approx(10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    bursty = synthetic_workload(20_000, arrival="gamma", cv=3.0, seed=1)
    gaps = np.diff([r.arrival_s for r in bursty.requests])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


def test_synthetic_empirical_lengths():
    w = synthetic_workload(300, lengths="empirical", prompt_lengths=[10, 20, 30], output_lengths=[1, 2, 3], seed=3)
    assert set(lengths(w)) <= {(10, 1), (20, 2), (30, 3)}  # equal-size pools are drawn as pairs
    assert len(set(lengths(w))) == 3
    w = synthetic_workload(300, lengths="empirical", prompt_lengths=[10, 20], output_lengths=[5], seed=3)
    assert {o for _, o in lengths(w)} == {5} and {p for p, _ in lengths(w)} == {10, 20}
    with pytest.raises(ValueError):
        synthetic_workload(10, lengths="empirical")
    with pytest.raises(ValueError):
        synthetic_workload(10, lengths="empirical", prompt_lengths=[0], output_lengths=[1])


@pytest.mark.parametrize("kwargs", [dict(arrival="uniform"), dict(lengths="zipf"), dict(rate_rps=0),
                                    dict(cv=0), dict(num_requests=0)])
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_workload(**{"num_requests": 10, **kwargs})


# --- transforms ------------------------------------------------------------------------------

def test_scale_rate_is_pure_and_noted():
    w = make([0.0, 1.0, 3.0], [(1, 1)] * 3)
    fast = scale_rate(w, 2.0)
    assert [r.arrival_s for r in fast.requests] == [0.0, 0.5, 1.5]
    assert [r.arrival_s for r in w.requests] == [0.0, 1.0, 3.0] and w.notes == []
    assert fast.notes == ["arrival rate scaled x2"]
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            scale_rate(w, bad)


def test_time_window_keeps_half_open_interval_and_rebases():
    w = make([0.0, 1.0, 2.0, 3.0, 4.0], [(i + 1, 1) for i in range(5)])
    win = time_window(w, 1.0, 3.0)
    assert [r.arrival_s for r in win.requests] == [0.0, 1.0]
    assert [r.request_id for r in win.requests] == [0, 1]
    assert [p for p, _ in lengths(win)] == [2, 3]
    assert "kept 2 of 5" in win.notes[-1]
    assert time_window(w, 10.0, 20.0).requests == []
    with pytest.raises(ValueError):
        time_window(w, 2.0, 2.0)


def test_first_n():
    w = make([0.0, 1.0, 2.0], [(1, 1), (2, 2), (3, 3)])
    assert lengths(first_n(w, 2)) == [(1, 1), (2, 2)]
    assert len(first_n(w, 10).requests) == 3
    with pytest.raises(ValueError):
        first_n(w, -1)


def test_apply_max_context_drop_renumbers():
    w = make([0.0, 1.0, 2.0, 3.0], [(50, 50), (90, 20), (10, 10), (100, 1)])
    d = apply_max_context(w, 100, "drop")
    assert lengths(d) == [(50, 50), (10, 10)]
    assert [r.request_id for r in d.requests] == [0, 1]
    assert [r.arrival_s for r in d.requests] == [0.0, 2.0]
    assert d.dropped_too_long == 2 and d.clipped_too_long == 0
    assert "dropped 2 of 4" in d.notes[-1]
    assert w.dropped_too_long == 0 and len(w.requests) == 4


def test_apply_max_context_clip_prompt_first_then_output():
    w = make([0.0, 1.0, 2.0, 3.0], [(90, 20), (10, 10), (5, 200), (1, 100)])
    c = apply_max_context(w, 100, "clip")
    assert lengths(c) == [(80, 20), (10, 10), (1, 99), (1, 99)]
    assert c.clipped_too_long == 3 and c.dropped_too_long == 0
    assert all(p + o <= 100 and p >= 1 and o >= 1 for p, o in lengths(c))
    assert "clipped 3 of 4" in c.notes[-1] and "2 outputs" in c.notes[-1]
    with pytest.raises(ValueError):
        apply_max_context(w, 1, "clip")
    with pytest.raises(ValueError):
        apply_max_context(w, 100, "truncate")


def test_make_workload_file_and_synthetic(tmp_path):
    path = write(tmp_path, "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n"
                 + "".join(f"{i},{1000 if i == 1 else 10},5\n" for i in range(6)))
    w = make_workload(str(path), num_requests=3, rate_scale=2.0, max_context_tokens=100)
    assert w.format == "vidur" and len(w.requests) == 3 and w.dropped_too_long == 1
    assert [r.arrival_s for r in w.requests] == [0.0, 1.0, 1.5]  # arrivals 0,2,3 (row 1 dropped) / 2
    clipped = make_workload(str(path), max_context_tokens=100, context_policy="clip")
    assert clipped.clipped_too_long == 1 and len(clipped.requests) == 6
    assert len(make_workload("synthetic").requests) == 1000
    s = make_workload("synthetic", num_requests=50, seed=4)
    assert len(s.requests) == 50 and s.requests == synthetic_workload(50, seed=4).requests
    with pytest.raises(WorkloadError):
        make_workload(str(tmp_path / "missing.csv"))


def test_describe_summarises(tmp_path):
    w = load_workload(write(tmp_path, "a.csv", AZURE))
    text = w.describe()
    assert "3 over 4.5 s" in text and "req/s" in text
    assert "prompt tokens: mean 550, p50 396" in text and "output tokens" in text and "p99" in text
    assert "requests: 0" in time_window(w, 100, 200).describe()


# --- CLI -------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "traces.workload", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_summary_and_errors_cleanly(tmp_path):
    ok = run_cli(str(write(tmp_path, "a.csv", AZURE)), "--rate-scale", "2")
    assert ok.returncode == 0 and "requests: 3" in ok.stdout and "scaled x2" in ok.stdout
    bad = write(tmp_path, "bad.csv", H + OK1 + "2023-11-16 18:15:46.5,abc,5\n")
    r = run_cli(str(bad))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"error: {bad}: line 3: ") and "Traceback" not in r.stderr
    assert run_cli(str(bad), "--skip-bad-rows").returncode == 0
    assert run_cli("synthetic", "--rate-scale", "0").returncode == 2
    assert "--num-requests" in run_cli("--help").stdout


def test_cli_writes_a_synthetic_workload_that_loads_back_exactly(tmp_path):
    """--write freezes a synthetic workload (burstier, longer prompts) into a file sim.run and real.run read."""
    from traces.workload import main, write_vidur_csv
    path = tmp_path / "w.csv"
    assert main(["synthetic", "--num-requests", "300", "--cv", "2.5", "--rate-rps", "11", "--seed", "3",
                 "--prompt-tokens", "2048", "2600", "12000", "--write", str(path)]) == 0
    w = load_workload(path)
    ref = synthetic_workload(300, rate_rps=11, cv=2.5, seed=3, prompt_stats=dict(p50=2048, mean=2600, max=12000))
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == \
           [(r.prompt_tokens, r.output_tokens) for r in ref.requests]
    assert [r.arrival_s for r in w.requests] == [r.arrival_s for r in ref.requests]  # full float precision
    assert max(r.prompt_tokens for r in w.requests) <= 12000
    assert np.median([r.prompt_tokens for r in w.requests]) > 1500  # longer than Azure conv's 1020
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps.std() / gaps.mean() > 1.8  # burstier than Azure conv's 1.09
    # a loaded trace written back reads the same too
    again = tmp_path / "again.csv"
    write_vidur_csv(w, again)
    assert load_workload(again).requests == w.requests


def test_cli_rejects_inconsistent_length_stats(capsys):
    from traces.workload import main
    assert main(["synthetic", "--prompt-tokens", "3000", "2000", "12000"]) == 2
    assert "MEDIAN < MEAN < MAX" in capsys.readouterr().err


def test_cli_refuses_synthetic_knobs_on_a_trace_file(tmp_path, capsys):
    from traces.workload import main
    path = write(tmp_path, "t.csv", AZURE)
    assert main([str(path), "--cv", "3"]) == 2
    assert "--cv shape a synthetic workload" in capsys.readouterr().err
    assert main([str(path), "--write", str(tmp_path / "no/such/dir/w.csv")]) == 2
    assert "cannot write" in capsys.readouterr().err
