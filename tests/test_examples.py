"""Every example runs, in its reduced mode, as part of the test suite."""

from tests.helpers import ROOT, load_script


def test_every_example_is_covered_here():
    assert {p.stem for p in (ROOT / "examples").glob("*.py")} == {"fem_tour"}


def test_fem_tour(capsys):
    result = load_script("examples/fem_tour.py").main(["--quick"])
    assert result["boundary_max"] == 0.0
    assert 0.0 < result["test_error"] < 10.0
    assert "test relative L2 error" in capsys.readouterr().out


def test_quick_start_configuration_is_valid():
    from fenop.train.config import read_config

    config = read_config(ROOT / "examples" / "darcy_quick.toml")
    assert config["data"]["path"] == str(ROOT / "darcy.h5")
    assert config["model"]["processor"] == "fno"
