"""A real geometry end to end, through the command: a plate with two elliptic holes
meshed with Gmsh (tests/fixtures/make_plate.py), data generated on it, a grid
processor and FEMultigrid (whose hierarchy refines a coarser Gmsh mesh of the plate,
so its boundary cuts the holes' curves by chords) trained, evaluated, used on a
finer mesh of the plate, and converted for ParaView."""

import h5py
import numpy as np
import pytest

from fenop.cli import main
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures"

CONFIG = """
[data]
path = "{data}"
n_train = 10
n_test = 4

[model]
{model}

[training]
epochs = 2
batch_size = 5
output = "{output}"
device = "cpu"
"""

MODELS = {
    "fno": 'processor = "fno"\nresolution = 24\n[model.options]\nn_modes = [8, 8]\n'
    "hidden_channels = 8\nn_layers = 2",
    "femultigrid": 'processor = "femultigrid"\n[model.hierarchy]\n'
    f'mesh = "{FIXTURES / "plate_coarse.msh"}"\nlevels = 2\n'
    "[model.options]\nwidth = 8\nn_layers = 2",
}


@pytest.fixture(scope="module")
def plate_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plate")
    for name, mesh, n in (("d.h5", "plate.msh", 14), ("fine.h5", "plate_fine.msh", 2)):
        args = ["generate", "darcy", "-n", str(n), "--mesh", str(FIXTURES / mesh)]
        assert main([*args, "-o", str(folder / name), "-q"]) == 0
    return folder


@pytest.mark.parametrize("processor", list(MODELS))
def test_a_plate_with_holes_from_gmsh_end_to_end(plate_data, tmp_path, processor, capsys):
    data, fine = plate_data / "d.h5", plate_data / "fine.h5"
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(data=data, model=MODELS[processor], output=tmp_path / "run"))
    assert main(["train", str(config), "-q"]) == 0
    best = str(tmp_path / "run" / "best")
    assert main(["evaluate", best, str(data), "--split", "test"]) == 0
    assert "over 4 samples" in capsys.readouterr().out
    # a finer mesh of the plate: its points on the holes' curves lie outside the
    # hierarchy's chords, and the model is moved to it
    assert main(["evaluate", best, str(fine)]) == 0
    l2 = float(capsys.readouterr().out.split("mean ")[1].split(",")[0])
    assert 0 < l2 < 1.0  # two epochs: a rough model, but a finite one on the new mesh
    predicted = tmp_path / "p.h5"
    assert main(["predict", best, str(fine), "-o", str(predicted), "-q"]) == 0
    with h5py.File(predicted) as f, h5py.File(fine) as g:
        assert f["u"].shape == g["u"].shape and np.isfinite(f["u"][()]).all()
    view = tmp_path / "view.xdmf"
    assert main(["convert", str(fine), str(view), "--predictions", str(predicted)]) == 0
    assert view.is_file() and (tmp_path / "view.h5").is_file()


STEPPER = """
[data]
path = "{data}"
state = "u"
n_train = 3
n_test = 1

[model]
processor = "fno"
resolution = 16
[model.options]
n_modes = [6, 6]
hidden_channels = 8
{constraint}
[training]
epochs = 1
batch_size = 8
output = "{output}"
device = "cpu"
"""


@pytest.mark.parametrize(
    ("pde", "dt", "constraint"),
    [
        ("heat", "0.005", '[model.constraint]\nkind = "global"\nn_basis = 4'),
        ("allen_cahn", "0.1", ""),
        ("advection_diffusion", "0.05", '[model.constraint]\nkind = "global"\nn_basis = 4'),
    ],
)
def test_trajectories_on_the_plate_train_a_stepper_that_rolls_out_on_a_finer_mesh(
    tmp_path, pde, dt, constraint, capsys
):
    steps = ["--steps", "4", "--dt", dt, "-q"]
    data, fine = tmp_path / "t.h5", tmp_path / "fine.h5"
    for path, mesh, n in ((data, "plate.msh", 4), (fine, "plate_fine.msh", 1)):
        assert (
            main(
                [
                    "generate",
                    pde,
                    "-n",
                    str(n),
                    "--mesh",
                    str(FIXTURES / mesh),
                    *steps,
                    "-o",
                    str(path),
                ]
            )
            == 0
        )
    with h5py.File(data) as f:
        assert f["u"].ndim == 3 and np.isfinite(f["u"][()]).all()
    config = tmp_path / "c.toml"
    config.write_text(STEPPER.format(data=data, output=tmp_path / "run", constraint=constraint))
    assert main(["train", str(config), "-q"]) == 0
    best = str(tmp_path / "run" / "best")
    assert main(["evaluate", best, str(data), "--split", "test"]) == 0
    assert "after    4 steps" in capsys.readouterr().out
    assert main(["predict", best, str(fine), "-o", str(tmp_path / "p.h5"), "-q"]) == 0
    with h5py.File(tmp_path / "p.h5") as f, h5py.File(fine) as g:
        assert f["u"].shape == g["u"].shape and np.isfinite(f["u"][()]).all()
