import subprocess
import sys

import h5py
import numpy as np
import pytest

from fenop.cli import main
from fenop.data import generate
from fenop.fem import unit_square


def test_generate_then_info(tmp_path, capsys):
    path = tmp_path / "d.h5"
    assert main(["generate", "poisson", "-n", "5", "--resolution", "9", "-o", str(path), "-q"]) == 0
    direct = generate(
        "poisson", 5, unit_square(9), seed=0, path=tmp_path / "direct.h5", progress=False
    )
    with h5py.File(path) as f, h5py.File(direct) as g:
        np.testing.assert_array_equal(f["u"][()], g["u"][()])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 complete" in out and "P1, 81 DOFs" in out and "poisson" in out


def test_options_domain_and_mesh_files(tmp_path, capsys):
    path = tmp_path / "l.h5"
    args = [
        "generate",
        "darcy",
        "-n",
        "2",
        "--domain",
        "lshape",
        "--resolution",
        "9",
        "-o",
        str(path),
    ]
    assert main([*args, "--option", "a_high=20", "-q"]) == 0
    with h5py.File(path) as f:
        assert set(np.unique(f["a"][()])) == {3.0, 20.0}
    mesh_file = tmp_path / "square.vtk"
    unit_square(7).save(str(mesh_file))
    assert (
        main(
            [
                "generate",
                "heat",
                "-n",
                "2",
                "--mesh",
                str(mesh_file),
                "-o",
                str(tmp_path / "h.h5"),
                "-q",
            ]
        )
        == 0
    )


def _status(args) -> int:
    """The exit status, whether main returns it or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "darcy", "-n", "2", "--mesh", "{tmp}/none.msh", "-o", "{out}"],
            "none.msh': no such file",
        ),
        (
            [
                "generate",
                "darcy",
                "-n",
                "2",
                "--mesh",
                "{tmp}/m.vtk",
                "--resolution",
                "5",
                "-o",
                "{out}",
            ],
            "not both",
        ),
        (["generate", "darcy", "-n", "0", "-o", "{out}"], "n_samples"),
        (["generate", "darcy", "-n", "2", "--option", "viscosity=1", "-o", "{out}"], "viscosity"),
        (
            [
                "generate",
                "darcy",
                "-n",
                "2",
                "--domain",
                "lshape",
                "--resolution",
                "8",
                "-o",
                "{out}",
            ],
            "odd",
        ),
        (["generate", "stokes", "-n", "2", "-o", "{out}"], "invalid choice: 'stokes'"),
        (["generate", "darcy", "-n", "2", "--option", "a_high", "-o", "{out}"], "KEY=VALUE"),
        (["info", "{tmp}/none.h5"], "none.h5: no such file"),
    ],
)
def test_bad_input_is_one_line_with_status_2_and_no_output(tmp_path, capsys, args, message):
    (tmp_path / "m.vtk").write_text("")
    out = tmp_path / "out.h5"
    args = [a.format(tmp=tmp_path, out=out) for a in args]
    assert _status(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_existing_output_of_another_recipe_is_kept(tmp_path, capsys):
    path = tmp_path / "d.h5"
    assert main(["generate", "darcy", "-n", "2", "--resolution", "5", "-o", str(path), "-q"]) == 0
    before = path.read_bytes()
    assert (
        main(["generate", "darcy", "-n", "2", "--resolution", "5", "--seed", "1", "-o", str(path)])
        == 2
    )
    assert "different seed" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_console_script_is_installed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fenop", "info", str(tmp_path / "none.h5")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no such file" in result.stderr
