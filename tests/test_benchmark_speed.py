"""The speed benchmark's machinery, not its figures: peak memory against a
known allocation, and a tiny run's JSON (every row, ratios from the recorded
times). Speed itself is never asserted here."""

import json
import statistics
import sys

import pytest
import torch

from benchmarks.speed import PeakMemory, main

BYTES = 200 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_counts_a_freed_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(BYTES // 4)  # ones, not empty: pages count once written
    del block
    peak = memory.peak_bytes()
    assert memory.exact
    assert BYTES <= peak < BYTES + 64 * 2**20, peak


def test_tiny_run_writes_every_row(tmp_path, capsys):
    path = tmp_path / "speed.json"
    main([
        "--layers", "1", "--hidden", "16", "--heads", "2", "--ffn", "32", "--vocab", "64",
        "--batch", "4", "--seq-len", "8", "--warmup", "0", "--steps", "5", "--threads", "1",
        "--ranks", "1", "2", "--methods", "rgp_r1", "rgp_r2", "dp_ghost_full", "dp_lora", "opacus_full",
        "--json", str(path),
    ])
    result = json.loads(path.read_text())
    assert set(result) == {"machine", "settings", "rows"}
    assert result["settings"]["batch"] == 4 and result["machine"]["cpu_count"] >= 1
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["nonprivate_full", "rgp_r1", "rgp_r2", "dp_ghost_full", "dp_lora", "opacus_full"]
    base = rows["nonprivate_full"]
    for name in rows:
        row = rows[name]
        times = row["seconds_per_update_all"]
        assert len(times) == 5 and row["seconds_per_update"] == statistics.median(times)
        assert row["examples_per_second"] == pytest.approx(4 / row["seconds_per_update"])
        paired = statistics.median(t / b for t, b in zip(times, base["seconds_per_update_all"]))
        assert row["time_ratio"] == pytest.approx(paired)
        assert row["peak_memory_bytes"] > 0
        assert row["memory_ratio"] == pytest.approx(row["peak_memory_bytes"] / base["peak_memory_bytes"])
    assert 0 < rows["rgp_r1"]["power_iteration_fraction"] < 1
    assert "power_iteration_fraction" not in rows["opacus_full"]
    out = capsys.readouterr().out
    assert "rgp_r2" in out and "dp_ghost_full" in out
