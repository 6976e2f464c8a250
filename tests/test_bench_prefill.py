"""The prefill benchmark's plumbing on CPU (its timings need CUDA): contenders, accuracy rows, ratios,
the table and the JSONL, at a tiny shape in Triton's interpreter with a wall-clock timer."""

import json
import time

import pytest
import torch

from deltaflex import bench_prefill as bp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_shapes_and_segment_lengths():
    names = [str(s) for s in bp.prefill_shapes()]
    assert names == ["1x4096x8x128", "1x8192x8x128", "1x16384x8x128", "1x32768x8x128", "1x65536x8x128",
                     "1x32768x16x128", "4x8192 packed x8x128"]
    assert bp._segments_tried(bp.PrefillShape((65536,), 8, 128), 64) == [32, 64, 128]
    assert bp._segments_tried(bp.PrefillShape((4096,), 8, 128), 0) == [16, 32]  # at least two segments


def test_rows_table_and_jsonl(monkeypatch, tmp_path):
    pytest.importorskip("triton")

    def wall_clock(run, x, cu, cu_cpu, packed):
        start = time.perf_counter()
        run(x, cu, cu_cpu, packed)
        return 1e3 * (time.perf_counter() - start)

    monkeypatch.setattr(bp, "_time", wall_clock)
    monkeypatch.setattr(bp, "ACCURACY_SHAPE", ((40,), 1, 16))
    monkeypatch.setattr(bp, "_segments_tried", lambda shape, auto: [2])
    monkeypatch.setattr(bp, "fla_run", lambda cu_always: bp.ours(1))  # a stand-in for fla
    monkeypatch.setattr(bp, "_ORACLE", {})
    shapes = [bp.PrefillShape((40,), 1, 16), bp.PrefillShape((20, 30), 1, 16)]
    rows = bp.run_in_process(DEVICE, shapes, fla=True, log=lambda s: None, rounds=1)
    bp.add_ratios(rows)
    timed = [r for r in rows if "ms" in r]
    assert [r["contender"] for r in timed] == ["ours auto (one-level)", "ours one-level", "ours G=2", "fla chunk"] * 2
    assert all(r["x_one_level"] > 0 and r["x_fla"] > 0 for r in timed)
    accuracy = [r for r in rows if r.get("accuracy")]
    assert len(accuracy) == 4 and all(r["o_err_correlated"] < 1e-2 and r["state_err_random"] < 1e-2 for r in accuracy)
    assert "4x8192" not in bp.table(rows) and "ours G=2" in bp.table(rows)
    out = tmp_path / "prefill.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(out.read_text().splitlines()) == len(rows)


def test_intracard_rows_survive_its_timeout(monkeypatch):
    measured = json.dumps({"shape": "1x4096x8x128", "contender": "fla intracard CP", "ms": 1.0})

    def timed_out(cmd, env, capture_output, text, timeout):
        assert env["FLA_INTRACARD_CP"] == "1" and timeout == 5
        raise bp.subprocess.TimeoutExpired(cmd, timeout, output=measured.encode() + b"\n")

    monkeypatch.setattr(bp.subprocess, "run", timed_out)
    rows = bp.run_fla_intracard(bp.prefill_shapes()[:2], log=lambda s: None, timeout=5)
    assert rows[0] == json.loads(measured)
    assert rows[1]["contender"] == "fla intracard" and "timed out after 5 s" in rows[1]["error"]


def test_rounds_keep_each_contenders_fastest(monkeypatch):
    times = iter([3.0, 1.0, 2.0, 5.0])  # round 1: a 3, b 1; round 2: a 2, b 5
    monkeypatch.setattr(bp, "_time", lambda run, x, cu, cu_cpu, packed: next(times))
    rows = bp._measure_rounds([("a", None), ("b", None)], bp.PrefillShape((40,), 1, 16), DEVICE, lambda s: None, 2)
    assert [(r["contender"], r["ms"]) for r in rows] == [("a", 2.0), ("b", 1.0)]
