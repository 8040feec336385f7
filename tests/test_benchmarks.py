"""Benchmark scripts run in a tiny configuration, so that they cannot rot unnoticed.

These check only that the scripts work; the figures come from full runs recorded
in BENCHMARKS.md.
"""

from tests.helpers import load_script


def test_fem_overhead_runs(capsys):
    results = load_script("benchmarks/fem_overhead.py").main(
        ["--resolution", "16", "--batch", "2", "--rounds", "1", "--steps", "1"]
    )
    assert results["bare FNO, MSE"]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 for r in results.values())
    assert "ratio to bare" in capsys.readouterr().out


def test_data_generation_runs(capsys):
    load_script("benchmarks/data_generation.py").main(["--samples", "4", "--resolution", "9"])
    out = capsys.readouterr().out
    assert "samples/s" in out and "fenop darcy (16 x 16 vertices)" in out
