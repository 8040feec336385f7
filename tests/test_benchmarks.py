"""Benchmark scripts run in a tiny configuration, so that they cannot rot unnoticed.

These check only that the scripts work; the figures come from full runs recorded
in BENCHMARKS.md.
"""

import itertools
import math

import numpy as np

from fenop.fem import is_refinement
from tests.helpers import load_script


def test_fem_overhead_runs(capsys):
    results = load_script("benchmarks/fem_overhead.py").main(
        ["--resolution", "16", "--batch", "2", "--rounds", "1", "--steps", "1"]
    )
    assert results["bare FNO, MSE"]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 for r in results.values())
    assert "ratio to bare" in capsys.readouterr().out


def test_data_generation_runs(capsys):
    load_script("benchmarks/data_generation.py").main(
        ["--samples", "4", "--resolution", "9", "--workers", "2", "--startup-repeats", "1"]
    )
    out = capsys.readouterr().out
    assert "samples/s" in out and "fenop darcy (16 x 16 vertices)" in out
    assert "forkserver s" in out


def test_darcy_runs(capsys):
    args = ["--resolution", "9", "--train", "8", "--test", "4", "--minutes", "0.001"]
    results = load_script("benchmarks/darcy.py").main([*args, "--width", "8", "--workers", "1"])
    assert set(results) == {
        "neuralop-fno",
        "fenop-fno",
        "fenop-mgno",
        "fenop-lsm",
        "fenop-femultigrid",
    }
    assert all(0 < r["error"] < 10 and r["epochs"] >= 1 for r in results.values())
    out, err = capsys.readouterr()
    assert "test rel L2" in out
    assert "fenop-femultigrid: epoch 1/" in err  # progress, apart from the table


def test_darcy_without_plain_fno_leaves_the_step_ratio_out(capsys):
    args = ["--resolution", "9", "--train", "8", "--test", "4", "--minutes", "0.001"]
    load_script("benchmarks/darcy.py").main([*args, "--width", "4", "--models", "fenop-fno"])
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fenop")]
    assert row.split()[6] == "-"  # not 1.00, a ratio to itself


def test_darcy_seed_sets_the_initialisation():
    import torch

    from fenop.fem import FunctionSpace, hierarchy, unit_square

    darcy = load_script("benchmarks/darcy.py")
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    spaces_mg = hierarchy(unit_square(3), 3, dirichlet="boundary")
    stats = {"input_stats": ([0.0], [1.0]), "output_stats": ([0.0], [1.0])}

    def weights(seed):
        ((_, model),) = darcy._models(
            ["fenop-mgno"], space, spaces_mg, 9, stats=stats, width=4, seed=seed
        )
        return torch.cat([p.detach().ravel() for p in model.parameters()])

    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(0), weights(1))


def test_inference_runs(capsys):
    results = load_script("benchmarks/inference.py").main(["--resolutions", "9", "--samples", "3"])
    assert results[9]["solve"] > 0 and results[9]["model"] > 0 and results["first_prediction_s"] > 0
    assert "time to first prediction" in capsys.readouterr().out


def test_constraint_inference_runs(capsys):
    results = load_script("benchmarks/constraint_inference.py").main(
        ["--resolutions", "17", "--samples", "2", "--batch", "2", "--rounds", "1"]
    )
    times = results[17]["times"]
    assert {"scikit-fem", "pyamg", "unconstrained", "MoE K=64 N=16"} <= set(times)
    assert all(t > 0 for t in times.values())
    assert results[17]["amg_error"] < 1e-6  # the AMG solve is the direct one's
    assert "| 17 | 289 |" in capsys.readouterr().out


def test_direct_solver_runs(capsys):
    results = load_script("benchmarks/direct_solver.py").main(
        ["--resolutions", "9", "--repeats", "1"]
    )
    assert set(results) == {("structured", 9), ("refined", 9)}
    assert all(t > 0 for row in results.values() for t in row.values())
    assert "RCM + MMD" in capsys.readouterr().out


def test_darcy_reports_a_diverged_model(tmp_path):
    import torch

    from fenop.data import FieldDataset, generate
    from fenop.fem import unit_square

    darcy = load_script("benchmarks/darcy.py")
    path = generate("darcy", 6, unit_square(5), seed=0, path=tmp_path / "d.h5", progress=False)
    train, test = FieldDataset(path, indices=range(4)), FieldDataset(path, indices=range(4, 6))

    class Blows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.scale * float("inf")

    result = darcy._fit(
        Blows(), train, test, minutes=0.01, device=torch.device("cpu"), batch=2, lr=1e-3, seed=0
    )
    assert result["diverged_epoch"] == 1 and result["epochs"] == 0


def test_darcy_schedule_is_not_shortened_by_a_slow_first_step(tmp_path):
    import time

    import torch

    from fenop.data import FieldDataset, generate
    from fenop.fem import unit_square

    darcy = load_script("benchmarks/darcy.py")
    path = generate("darcy", 10, unit_square(5), seed=0, path=tmp_path / "d.h5", progress=False)
    train, test = FieldDataset(path, indices=range(8)), FieldDataset(path, indices=range(8, 10))

    class SlowStart(torch.nn.Module):  # one-off set-up in the first step, like CUDA's
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.5)
            return x * self.scale

    result = darcy._fit(
        SlowStart(), train, test, minutes=0.05, device=torch.device("cpu"), batch=2, lr=1e-3, seed=0
    )
    # Sized from the first epoch's duration, the 3-second budget would allow 6
    # epochs; sized from its median step (milliseconds), the whole budget is used.
    assert result["epochs"] > 12


def test_sparse_product_runs(capsys):
    results = load_script("benchmarks/sparse_product.py").main(["--rounds", "1", "--steps", "1"])
    assert len(results) == 4 and all(r["ratio"] > 0 for r in results.values())
    assert "autograd ms" in capsys.readouterr().out


def test_multigrid_depth_runs(tmp_path, capsys):
    args = ["--resolution", "9", "--train", "8", "--test", "4", "--epochs", "3", "--width", "4"]
    results = load_script("benchmarks/multigrid_depth.py").main(
        [*args, "--hierarchies", "5,9", "4,9", "--workers", "1", "--data", str(tmp_path)]
    )
    assert set(results) == {"5,9", "4,9"}  # nested, and not nested
    assert all(r["epochs"] == 3 and 0 < r["error"] < 10 for r in results.values())
    assert "test rel L2" in capsys.readouterr().out


def test_femultigrid_step_runs(capsys):
    result = load_script("benchmarks/femultigrid_step.py").main(
        ["--resolution", "9", "--batch", "2", "--width", "4", "--rounds", "1", "--steps", "1"]
    )
    assert result["step_ms"] > 0 and result["launches"] > 100  # 4 layers of V-cycles
    assert "operators doing work per step" in capsys.readouterr().out


def test_darcy_femultigrid_levels_halve_the_cells_down_to_the_coarsest():
    darcy = load_script("benchmarks/darcy.py")
    assert darcy.square_levels(33) == [9, 17, 33]
    assert darcy.square_levels(85) == [11, 22, 43, 85]  # 21 cells cannot be halved
    assert darcy.square_levels(85, coarsest=22) == [22, 43, 85]
    assert darcy.square_levels(9) == [9]
    spaces = darcy.square_hierarchy([6, 11, 22, 43])
    assert [s.n_dofs for s in spaces] == [36, 121, 484, 1849]
    pairs = itertools.pairwise(spaces)
    assert [is_refinement(fine.mesh, coarse.mesh) for coarse, fine in pairs] == [True, False, True]


def test_train_startup_runs(capsys):
    sizes = ["--resolution", "9", "--train", "6", "--test", "2", "--batch", "2"]
    results = load_script("benchmarks/train_startup.py").main(
        [*sizes, "--rounds", "1", "--steps", "1", "--processors", "mgno"]
    )
    startup = next(r for (task, _), r in results.items() if task == "start-up")
    assert startup["seconds"] > 0 and startup["store_opens"] >= 1
    assert "| step mgno |" in capsys.readouterr().out


def test_constraint_formulations_runs(capsys):
    results = load_script("benchmarks/constraint_formulations.py").main(
        ["--resolution", "17", "--basis", "16"]
    )
    assert all(r["converged"] and r["error"] > 0 for r in results.values())
    assert "two-level Galerkin" in capsys.readouterr().out


def test_distributed_runs(capsys):
    results = load_script("benchmarks/distributed_training.py").main(
        ["--steps", "1", "--batch", "4", "--resolution", "9", "--experts", "3"]
    )
    assert set(results) == {"1x1", "1x2", "2x1", "2x1 experts"}
    assert results["2x1"]["all_reduce"] > 0 and math.isnan(results["1x1"]["all_reduce"])
    assert all(row["step"] > 0 for row in results.values())
    assert "samples/s" in capsys.readouterr().out


def test_hard_constraints_accuracy_trains_each_variant_for_the_budget(tmp_path, capsys):
    variants = [
        "unconstrained",
        "soft (physics weight 1)",
        "global, Galerkin, N=32",
        "MoE K=4, two-level Galerkin",
    ]
    small = ["--resolution", "9", "--samples", "8", "4", "--batch", "4", "--basis", "4"]
    results = load_script("benchmarks/hard_constraints.py").main(
        ["accuracy", *small, "--seconds", "1.5", "--data", str(tmp_path), "--variants", *variants]
    )
    assert set(results) == set(variants)
    for row in results.values():
        # Stopped by the clock: past the budget by at most about one step.
        assert 1.5 <= row["seconds"] < 1.5 + 2 * row["seconds"] / row["steps"] + 0.5
        assert 0 < row["test_l2"] < 10 and 0 < row["test_h1"] < 10
    # K N / n_free: 4 experts of 4 fields over the 7 x 7 free DOFs; N from the name
    out = capsys.readouterr().out
    assert "| MoE K=4, two-level Galerkin | 0.33 |" in out
    assert "| global, Galerkin, N=32 | 0.65 |" in out


def test_hard_constraints_accuracy_trains_femultigrid_on_the_stores_hierarchy(tmp_path, capsys):
    small = ["--resolution", "17", "--samples", "8", "4", "--batch", "4", "--basis", "4"]
    budget = ["--seconds", "1", "--data", str(tmp_path)]
    variants = ["unconstrained", "global, default, N=8"]
    results = load_script("benchmarks/hard_constraints.py").main(
        ["accuracy", *small, *budget, "--processor", "femultigrid", "--variants", *variants]
    )
    assert set(results) == set(variants)
    assert all(0 < row["test_l2"] < 10 and row["steps"] >= 1 for row in results.values())
    assert "FEMultigrid on 9 x 9 -> 17 x 17," in capsys.readouterr().out


def test_hard_constraints_scaling_and_layer_run(capsys):
    script = load_script("benchmarks/hard_constraints.py")
    small = ["--pde", "darcy", "--batch", "2", "--basis", "4", "--steps", "1"]
    variants = ["unconstrained", "basis only", "moe K=16"]
    script.main(["scaling", "--resolutions", "9", "--variants", *variants, *small])
    script.main(["layer", "--resolution", "9", "--variants", "global", "moe K=16", *small])
    out = capsys.readouterr().out
    assert "| 9 | 81 | moe K=16 | 16 |" in out and "failed" not in out
    assert "| 9 | 81 | basis only | 0 |" in out
    assert "| global |" in out
    assert "torch.float32:" in out and "GB/s" in out  # the sparse product's bound


def test_constraint_at_scale_takes_a_trained_models_error_apart(tmp_path, capsys):
    script = load_script("benchmarks/constraint_at_scale.py")
    small = ["--resolution", "17", "--seconds", "1", "--samples", "8", "4", "--measured", "2"]

    def errors() -> dict[str, tuple[str, str]]:
        """Each row's relative L2 and H1 errors, as printed."""
        script.main([*small, "--data", str(tmp_path)])
        rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()]
        return {row[0].strip(): (row[1], row[2]) for row in rows[2:] if len(row) == 4}

    first = errors()
    assert {"unconstrained", "Jacobi, 8 sweeps", "4 sweeps, Galerkin N=16, 4 sweeps"} <= set(first)
    l2, h1 = (float(v) for v in first["unconstrained"])
    assert 0 < l2 < h1 < 10
    # smoothing lowers the H1 error of the trained model's output, either smoother
    assert float(first["Jacobi, 8 sweeps"][1]) < h1
    assert float(first["Chebyshev 1/30, 8 sweeps"][1]) < h1
    assert "2 Chebyshev 1/10, coarse 9, the same" in first
    # the weights are kept beside the data: a second run takes the same model apart
    assert errors() == first


def test_dynamics_trains_and_rolls_out_every_variant(tmp_path, capsys):
    script = load_script("benchmarks/dynamics.py")
    small = ["--pde", "allen_cahn", "--resolution", "17", "--samples", "4", "2"]
    small += ["--horizon", "2", "--data", str(tmp_path)]
    results = script.main([*small, "--seconds", "0.3"])
    assert set(results) == set(script.VARIANTS)
    for name, row in results.items():  # a 4H = 8-step rollout of each, scored at every step
        given = script.SHAPES.get(name, (1, 1))[0] - 1  # true states it starts from
        assert row["steps"] >= 1 and row["curve"].shape == (8,)
        assert np.isnan(row["curve"][:given]).all()
        assert ((row["curve"][given:] > 0) & (row["curve"][given:] < 10)).all()
    capsys.readouterr()
    no_flux = ["--pde", "heat", "--option", "boundary=no_flux", "--resolution", "9"]
    no_flux += ["--samples", "4", "2", "--horizon", "2", "--data", str(tmp_path)]
    script.main([*no_flux, "--seconds", "0.3", "--variants", "fno", "fno-hard-coarse"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    drift = {row[1].strip(): float(row[-2]) for row in rows if len(row) == 12 and "fno" in row[1]}
    assert drift["fno-hard-coarse"] < 1e-6 < drift["fno"]  # heat kept by the constraint
    timed = ["fno", "fno-moe-linearised", "mgno"]
    timing = script.main([*small, "--timing", "--grid", "8", "--variants", *timed])
    assert set(timing) == set(timed) and all(seconds > 0 for seconds in timing.values())
    assert "fenop's grid 8 x 8" in capsys.readouterr().out
