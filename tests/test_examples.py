"""Every example runs, in its reduced mode, as part of the test suite."""

from tests.helpers import ROOT, load_script


def test_every_example_is_covered_here():
    assert {p.stem for p in (ROOT / "examples").glob("*.py")} == {
        "fem_tour",
        "hard_constraints",
        "heat_rollout",
        "own_pde",
        "predict_hdf5",
        "train_darcy",
        "train_lshape",
    }


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


def test_the_plate_configuration_trains_on_the_plate_mesh(tmp_path):
    # examples/darcy_plate.toml, whose run makes the README's picture, on a few samples
    from fenop.data import generate
    from fenop.fem import load_mesh
    from fenop.train.config import read_config
    from fenop.train.run import build_from_config

    config = read_config(ROOT / "examples" / "darcy_plate.toml")
    assert config["data"]["path"] == str(ROOT / "plate.h5")
    config["data"].update(path=str(tmp_path / "plate.h5"), n_train=3, n_test=1)
    mesh = load_mesh(ROOT / "tests" / "fixtures" / "plate.msh")
    generate("darcy", 4, mesh, seed=0, path=config["data"]["path"], progress=False)
    model, train, _ = build_from_config(config)
    x, _ = train[0]
    assert model(x[None]).shape == (1, 1, train.space.n_dofs)


def test_femultigrid_configuration_builds_on_the_quick_start_data(tmp_path):
    from fenop.data import generate
    from fenop.fem import unit_square
    from fenop.train.config import read_config
    from fenop.train.run import build_from_config

    config = read_config(ROOT / "examples" / "darcy_femultigrid.toml")
    config["data"].update(path=str(tmp_path / "d.h5"), n_train=3, n_test=1)
    generate("darcy", 4, unit_square(33), seed=0, path=config["data"]["path"], progress=False)
    model, train, _ = build_from_config(config)
    # the hierarchy ends on the data's own nodes: the interpolation is a renumbering
    assert model.processor.space.n_dofs == train.space.n_dofs == 33 * 33
    x, _ = train[0]
    assert model(x[None]).shape == (1, 1, 33 * 33)


def test_train_darcy(tmp_path):
    result = load_script("examples/train_darcy.py").main(["--quick", "--output", str(tmp_path)])
    assert 0 < result["test_error"] < 10 and result["picture"].is_file()
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_train_lshape(tmp_path):
    result = load_script("examples/train_lshape.py").main(["--quick", "--output", str(tmp_path)])
    assert result["boundary_max"] == 0.0 and result["picture"].is_file()


def test_heat_rollout(tmp_path):
    import meshio

    result = load_script("examples/heat_rollout.py").main(["--quick", "--output", str(tmp_path)])
    # two epochs on six trajectories: the constraint per step already holds the
    # rollout where the unconstrained model has learnt nothing yet
    assert result["constrained"] < 0.5 < result["unconstrained"]
    with meshio.xdmf.TimeSeriesReader(str(result["xdmf"])) as reader:
        reader.read_points_cells()
        assert reader.num_steps == 7  # the initial state and 6 steps
        _, data, _ = reader.read_data(6)
    assert {"u", "u_predicted", "u_error"} <= set(data)


def test_predict_hdf5(tmp_path):
    result = load_script("examples/predict_hdf5.py").main(["--quick", "--output", str(tmp_path)])
    assert result["test_error"] <= 0.05  # the shipped model, on a mesh it never saw
    assert result["output"].is_file()


def test_hard_constraints(tmp_path, capsys):
    results = load_script("examples/hard_constraints.py").main(
        ["--quick", "--output", str(tmp_path)]
    )
    hard, free = results["hard (global Galerkin)"], results["unconstrained"]
    # After the same short training the constrained model is far better than the same
    # model alone (measured 0.12 against 0.42), and so is its residual.
    assert hard["test_error"] < 0.5 * free["test_error"]
    assert hard["residual"] < free["residual"]
    assert "relative residual" in capsys.readouterr().out


def test_the_slurm_script_runs_torchrun_outside_slurm(tmp_path):
    # Without SLURM_JOB_ID the script launches torchrun on this machine: the same
    # launcher line a cluster runs through srun, here with 2 processes on the CPU.
    import os
    import socket
    import subprocess

    from fenop.data import generate
    from fenop.fem import unit_square
    from tests.helpers import SMALL_CONFIG

    generate("darcy", 16, unit_square(9), seed=0, path=tmp_path / "d.h5", progress=False)
    (tmp_path / "c.toml").write_text(SMALL_CONFIG)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(GPUS_PER_NODE="2", PORT=str(port))
    script = str(ROOT / "examples" / "slurm.sh")
    done = subprocess.run(
        ["bash", script, str(tmp_path / "c.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    usage = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage: sbatch examples/slurm.sh" in usage.stderr


def test_own_pde():
    # A residual written as a user writes one: zero at an independent solver's
    # solutions (scikit-fem's assembly, the same quadrature), and the constrained
    # output meets the Galerkin condition against the basis the network emitted.
    result = load_script("examples/own_pde.py").main(["--quick"])
    assert result["residual_at_solution"] < 1e-12
    assert result["converged"] and result["galerkin"] < 1e-6
    assert 0 < result["test_error"] < 10
