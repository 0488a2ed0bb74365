"""write_table: times written to the nanosecond (the clocks' resolution), everything else as given."""
from __future__ import annotations

import csv

import pytest

from traces.profile import PROFILE
from traces.schema import NS_DIGITS, REQUESTS, STEPS, TraceSchemaError, read_table, write_table


def _step(t0, t1, busy):
    return (t0, t1, "gpu1", "decode", 8, 8, 800, 0, 0, -1, "pd", 1, busy, 0)


def test_step_times_are_written_to_the_nanosecond(tmp_path):
    # a perf_counter difference: whole nanoseconds plus float noise in the last digits
    path = write_table(tmp_path / "steps.csv", STEPS, [_step(0.013725775000011708, 0.0152870210000628, 1.5e-3 + 3e-13)])
    row = next(csv.DictReader(path.open()))
    assert (row["t_start_s"], row["t_end_s"], row["busy_s"]) == ("0.013725775", "0.015287021", "0.0015")
    df = read_table(path, STEPS)
    assert abs(df.t_end_s[0] - 0.0152870210000628) < 0.5 * 10 ** -NS_DIGITS


def test_rounding_keeps_end_after_start(tmp_path):
    # ends a hair after their starts round onto the same nanosecond, never before it
    t = 12.345678901
    rows = [_step(t, t + d, d) for d in (0.0, 1e-13, 4e-10, 6e-10)]
    df = read_table(write_table(tmp_path / "steps.csv", STEPS, rows), STEPS)
    assert (df.t_end_s >= df.t_start_s).all()
    assert list(df.t_end_s - df.t_start_s) == pytest.approx([0.0, 0.0, 0.0, 1e-9], abs=1e-12)


def test_missing_times_and_other_columns_are_kept(tmp_path):
    rows = [(0, 0.1234567891234, 10, 5, 0, None, None, None, None, None, 0.5, None, None, "pd", 0, "rejected", "full"),
            (1, 0.2, 10, 5, 5, 0.3000000000001, 0.4, None, None, 0.4, 0.9, "gpu0", "gpu1", "pd", 0, "finished", None)]
    path = write_table(tmp_path / "requests.csv", REQUESTS, rows)
    got = list(csv.reader(path.open()))[1:]
    assert got[0] == ["0", "0.123456789", "10", "5", "0", "", "", "", "", "", "0.5", "", "", "pd", "0", "rejected", "full"]
    assert got[1][1:7] == ["0.2", "10", "5", "5", "0.3", "0.4"]


def test_profile_seconds_keep_full_precision(tmp_path):
    # a profile's rows are medians, some of a few microseconds (rates per token below a nanosecond): not rounded
    row = ("decode_program", 1, 1, 1024, 1, 0, 1, 0, 1.2345678912345e-06) + (None,) * (len(PROFILE.columns) - 9)
    path = write_table(tmp_path / "profile.csv", PROFILE, [row])
    assert next(csv.DictReader(path.open()))["seconds"] == "1.2345678912345e-06"


def test_validation_still_runs_before_rounding(tmp_path):
    with pytest.raises(TraceSchemaError, match="t_end_s before t_start_s"):
        write_table(tmp_path / "steps.csv", STEPS, [_step(1.0, 0.5, 0.0)])


def test_compact_run_archive_rounds_times_only(tmp_path):
    """bench/compact_run_archive.py: an archive whose times carry float noise shrinks; its times land on the
    nanosecond, every other cell and file keeps its bytes, and the run's numbers do not move."""
    import io
    import lzma
    import random
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import compact_run_archive as cra

    src = root / "tests/fixtures/run_pd"
    rng = random.Random(0)
    noisy = {}
    for name in ("requests.csv", "steps.csv"):
        rows = list(csv.reader((src / name).open()))
        table = cra.TABLES[name[:-4]]
        times = [i for i, c in enumerate(rows[0]) if table.columns[i].unit == "s" and table.columns[i].dtype == "float"]
        for r in rows[1:]:  # perf_counter-like: whole ns plus noise in the last digits
            for i in times:
                if r[i]:
                    r[i] = repr(round(float(r[i]), 9) + rng.uniform(0, 4e-13))
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        noisy[name] = out.getvalue().encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(src.iterdir()):
            data = noisy.get(f.name, f.read_bytes())
            info = tarfile.TarInfo(f"runs/pd/{f.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "runs.tar.xz"
    archive.write_bytes(lzma.compress(buf.getvalue(), preset=9))
    before = archive.stat().st_size
    assert cra.main([str(archive)]) == 0
    assert archive.stat().st_size < before
    with tarfile.open(archive) as tar:
        got = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        tar.extractall(tmp_path / "out", filter="data")
    assert set(got) == {f.name for f in src.iterdir()}
    for name, data in got.items():
        if name not in noisy:
            assert data == (src / name).read_bytes(), name
    old, new = (list(csv.reader(io.StringIO(x.decode()))) for x in (noisy["steps.csv"], got["steps.csv"]))
    assert len(old) == len(new) and old[0] == new[0]
    for a, b in zip(old[1:], new[1:]):
        assert b[2:12] == a[2:12] and b[13] == a[13]  # device .. num_steps, kv_bytes: verbatim
        for i in (0, 1, 12):
            assert float(b[i]) == round(float(b[i]), 9) and abs(float(b[i]) - float(a[i])) < 1e-12
    change = cra._largest_change(cra.run_metrics(src), cra.run_metrics(tmp_path / "out/runs/pd"))
    assert change < 1e-6
