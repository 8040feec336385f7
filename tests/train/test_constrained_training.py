"""A hard-constrained model through the whole product: configuration, training,
checkpoint, another mesh, the command; and the soft physics loss."""

import json

import numpy as np
import pytest
import torch

from fenop.cli import main
from fenop.data import generate
from fenop.fem import unit_square
from fenop.train import load_model, read_config
from fenop.train.config import ConfigError
from fenop.train.config import read_config as read_training_config
from fenop.train.run import train_from_config
from tests.helpers import SMALL_CONFIG

CONFIG = SMALL_CONFIG.replace(
    "\n[training]", "[model.constraint]\nn_basis = 4\nexperts = 2\nsweeps = 2\n\n[training]"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constrained")
    generate("darcy", 16, unit_square(9), seed=0, path=folder / "d.h5", progress=False)
    (folder / "c.toml").write_text(CONFIG)
    history = train_from_config(folder / "c.toml", progress=False)
    return folder, history


def test_a_constrained_configuration_trains_and_its_checkpoint_loads(trained):
    folder, history = trained
    assert len(history) == 2 and np.isfinite(history[-1]["test_l2"])
    config = read_config(folder / "run" / "best")
    constraint = config["model"]["constraint"]
    assert constraint["pde"] == "darcy" and constraint["inputs"] == ["a"]
    assert constraint["n_basis"] == 4 and config["model"]["options"]["out_channels"] == 5
    model = load_model(folder / "run" / "best")
    assert model.n_basis == 4 and model.constraint.partition.n_experts == 2
    with h5py_file(folder / "d.h5") as f:
        a = torch.from_numpy(f["a"][:2].astype(np.float32))[:, None]
    again = load_model(folder / "run" / "best")
    with torch.no_grad():
        torch.testing.assert_close(again(a), model(a))
    assert bool(model.constraint.report["converged"].all())


def h5py_file(path):
    import h5py

    return h5py.File(path, "r")


def test_the_command_predicts_on_another_mesh_and_says_what_the_model_is(trained, capsys):
    folder, _ = trained
    finer = folder / "finer.h5"
    assert main(["generate", "darcy", "-n", "2", "--resolution", "17", "-o", str(finer), "-q"]) == 0
    best = str(folder / "run" / "best")
    assert main(["predict", best, str(finer), "-o", str(folder / "p.h5"), "-q"]) == 0
    assert main(["evaluate", best, str(finer)]) == 0
    assert main(["info", best]) == 0
    out = capsys.readouterr().out
    assert "relative L2" in out and '"kind": "moe"' in out and '"n_basis": 4' in out
    import h5py

    with h5py.File(folder / "p.h5") as f:
        u = f["u"][()]
        assert u.shape == (2, 289) and np.isfinite(u).all() and f.attrs["constraint_failed"] == 0


def test_the_soft_physics_loss_trains(tmp_path):
    generate("darcy", 8, unit_square(9), seed=0, path=tmp_path / "d.h5", progress=False)
    text = CONFIG.replace("[model.constraint]\nn_basis = 4\nexperts = 2\nsweeps = 2\n", "")
    text = text.replace("n_train = 12\nn_test = 4", "n_train = 6\nn_test = 2")
    (tmp_path / "c.toml").write_text(
        text.replace('output = "run"', 'output = "run"\nphysics_weight = 0.5')
    )
    history = train_from_config(tmp_path / "c.toml", progress=False)
    assert np.isfinite(history[-1]["train_loss"])
    settings = json.loads((tmp_path / "run" / "last" / "training.json").read_text())["settings"]
    assert settings["physics_weight"] == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("experts = 2", "experts = 2\ndofs_per_expert = 10"),
            "one of experts and dofs_per_expert",
        ),
        (("experts = 2", "experts = 2\nexpert = 3"), r"unknown key model.constraint.expert"),
        (("sweeps = 2", 'sweeps = 2\ncondition = "ritz"'), r"condition must be one of"),
        (("sweeps = 2", 'sweeps = 2\nnonlinear = "bfgs"'), r"nonlinear must be one of"),
        (("sweeps = 2", "sweeps = 2\nupdate = []"), r"update must be one of"),
        (("sweeps = 2", "sweeps = 2\nconserve = 1"), r"conserve must be bool"),
        (("n_basis = 4", "n_basis = 0"), r"n_basis must be positive"),
        (("n_basis = 4", 'n_basis = "four"'), r"n_basis must be int, got 'four'"),
        (('output = "run"', 'output = "run"\nphysics_weight = -1'), "physics_weight must be"),
    ],
)
def test_constraint_tables_are_checked_key_by_key(tmp_path, change, message):
    (tmp_path / "c.toml").write_text(CONFIG.replace(*change))
    with pytest.raises(ConfigError, match=message):
        read_training_config(tmp_path / "c.toml")


def test_experts_solve_the_linearisation_unless_a_description_predates_the_option():
    from fenop.fem import FunctionSpace
    from fenop.train.physics import build_constraint, constraint_table

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    store = {"pde": "nonlinear_diffusion", "parameters": {}, "inputs": ["f"]}
    table = {**constraint_table({"experts": 2}), **store}
    assert build_constraint(table, space).nonlinear == "linearised"
    newton = {**constraint_table({"experts": 2, "nonlinear": "newton"}), **store}
    assert build_constraint(newton, space).nonlinear == "newton"
    # a checkpoint's description written before the option: its experts' Newton solves
    older = {key: value for key, value in table.items() if key != "nonlinear"}
    assert build_constraint(older, space).nonlinear == "newton"


@pytest.mark.parametrize("kind", ["moe", "global"])
def test_the_global_solve_is_chosen_by_the_residual_unless_a_description_predates_it(kind):
    from fenop.fem import FunctionSpace
    from fenop.train.physics import build_constraint, constraint_table

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    table = constraint_table({"kind": kind, **({"experts": 2} if kind == "moe" else {})})
    assert table["global_solve"] == "auto"
    steady = {**table, "pde": "nonlinear_diffusion", "parameters": {}, "inputs": ["f"]}
    assert build_constraint(steady, space).global_solve == "linearised"
    step = {**table, "pde": "allen_cahn", "parameters": {}, "inputs": ["u_prev"]}
    assert build_constraint(step, space).global_solve == "newton"
    # a checkpoint's description written before the option: Newton's method
    older = {key: value for key, value in steady.items() if key != "global_solve"}
    assert build_constraint(older, space).global_solve == "newton"


@pytest.mark.parametrize("kind", ["moe", "global"])
def test_a_description_from_before_the_two_grid_default_loads_without_it(kind):
    from fenop.fem import FunctionSpace
    from fenop.train.physics import build_constraint, constraint_table

    space = FunctionSpace(unit_square(33), dirichlet="boundary")
    store = {"pde": "darcy", "parameters": {}, "inputs": ["a"]}
    table = {
        **constraint_table({"kind": kind, **({"experts": 4} if kind == "moe" else {})}),
        **store,
    }
    assert (table["smoothing"], table["coarse_grid"]) == (4, "auto")
    fresh = build_constraint(table, space)
    assert (fresh.smoothing, fresh.coarse_grid) == (4, 9)
    # a checkpoint's description written before the options: no sweeps, no grid
    older = {key: value for key, value in table.items() if key not in ("smoothing", "coarse_grid")}
    old = build_constraint(older, space)
    assert (old.smoothing, old.coarse_grid, old.coarse_space) == (0, 0, None)


def test_the_number_of_basis_fields_defaults_by_kind_and_is_written_down():
    from fenop.train.physics import constraint_table

    assert constraint_table({"experts": 2})["n_basis"] == 16
    assert constraint_table({"kind": "global"})["n_basis"] == 32
    assert constraint_table({"kind": "global", "n_basis": 8})["n_basis"] == 8
    # the filled-in table is what a checkpoint records: reading it back keeps it
    table = constraint_table({"kind": "global"})
    assert constraint_table(table) == table


def test_a_constraints_options_are_its_layers_keyword_arguments():
    import inspect

    from fenop.fem import FunctionSpace
    from fenop.operators import HardConstraint, MoEConstraint
    from fenop.train.physics import build_constraint, constraint_options, constraint_table

    def keywords(cls):
        parameters = inspect.signature(cls).parameters.values()
        return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}

    own = {"kind", "n_basis"}
    assert set(constraint_options("global")) == own | keywords(HardConstraint)
    experts = own | {"partition", "experts", "dofs_per_expert"}
    assert set(constraint_options("moe")) == experts | keywords(MoEConstraint)
    # Newton's settings, once not settable from a configuration, reach the layer.
    table = constraint_table(
        {"kind": "global", "max_iterations": 7, "tolerance": 1e-6, "chord": False}
    )
    store = {"pde": "nonlinear_diffusion", "parameters": {}, "inputs": ["f"]}
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    layer = build_constraint({**table, **store}, space)
    assert (layer.max_iterations, layer.tolerance, layer.chord) == (7, 1e-6, False)
    with pytest.raises(ValueError, match=r"model\.constraint\.chord must be bool, got 1"):
        constraint_table({"kind": "global", "chord": 1})
    with pytest.raises(ValueError, match=r"max_iterations must be int, got 2\.5"):
        constraint_table({"kind": "global", "max_iterations": 2.5})


def test_the_sweeps_are_named_as_schwarz_methods_and_old_names_still_load():
    from fenop.fem import FunctionSpace, MetisPartition
    from fenop.operators import MoEConstraint
    from fenop.train.physics import build_constraint, constraint_table

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    residual_of = {"pde": "darcy", "parameters": {}, "inputs": ["a"]}
    for old, new in (("colours", "multiplicative"), ("owners", "restricted_additive")):
        assert constraint_table({"experts": 2, "update": old})["update"] == new
        layer = build_constraint(
            {**constraint_table({"experts": 2}), **residual_of, "update": old}, space
        )
        assert layer.update == new and layer.description["update"] == new
        residual = layer.residual
        assert MoEConstraint(residual, MetisPartition(experts=2), update=old).update == new
    assert constraint_table({"experts": 2})["update"] == "multiplicative"


def test_experts_without_a_size_get_256_dofs_each():
    from fenop.fem import FunctionSpace
    from fenop.train.physics import build_constraint, constraint_table

    table = constraint_table({"kind": "moe"})
    assert (table["experts"], table["dofs_per_expert"]) == (None, 256)
    # sized by DOFs, the experts keep their size on a finer mesh
    store = {"pde": "darcy", "parameters": {}, "inputs": ["a"]}
    for n, experts in ((33, 4), (65, 17)):
        space = FunctionSpace(unit_square(n), dirichlet="boundary")
        layer = build_constraint({**table, **store}, space)
        assert layer.partition.n_experts == experts == round(n * n / 256)
    given = constraint_table({"kind": "moe", "experts": 8})
    assert (given["experts"], given["dofs_per_expert"]) == (8, None)
    assert constraint_table({"kind": "global"}).get("dofs_per_expert") is None
