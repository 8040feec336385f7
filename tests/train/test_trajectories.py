"""A stepper over trajectory stores: errors at every horizon, rollouts written to a
store, and the command's evaluate and predict on it."""

import h5py
import numpy as np
import pytest
import torch

from fenop.cli import main
from fenop.data import StepDataset, StoreError, generate, read_store
from fenop.data.store import create_store, write_samples
from fenop.fem import RelativeH1Loss, RelativeL2Loss, unit_square
from fenop.train import load_model, rollout
from fenop.train.run import train_from_config
from fenop.train.trajectories import (
    RolloutEvaluation,
    evaluate_rollouts,
    predict_rollouts,
    stepper_of,
)

CONFIG = """
[data]
path = "heat.h5"
state = "u"
history = {history}
n_train = 4
n_test = 2
[model]
processor = "fno"
resolution = 8
[model.options]
n_modes = [4, 4]
hidden_channels = 8
[training]
epochs = 1
batch_size = 8
output = "run{history}"
device = "cpu"
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Heat trajectories (6 samples of 6 states) and steppers of history 1 and 2."""
    folder = tmp_path_factory.mktemp("trajectories")
    generate(
        "heat",
        6,
        unit_square(9),
        seed=0,
        path=folder / "heat.h5",
        progress=False,
        n_steps=5,
        t_final=0.025,
        trajectory=True,
    )
    for history in (1, 2):
        (folder / f"h{history}.toml").write_text(CONFIG.format(history=history))
        train_from_config(folder / f"h{history}.toml", progress=False)
    return folder


@pytest.mark.parametrize("history", [1, 2])
def test_the_errors_are_those_of_the_rollout_and_of_single_steps(folder, history):
    checkpoint = folder / f"run{history}" / "best"
    assert stepper_of(checkpoint)["history"] == history
    evaluation = evaluate_rollouts(checkpoint, folder / "heat.h5", samples=slice(4, 6))
    model = load_model(checkpoint).eval()
    states = StepDataset(folder / "heat.h5", history=history).trajectories([4, 5])
    truth = states[:, history:]
    with torch.no_grad():
        free = rollout(model, states[:, :history], truth.shape[1])
        forced = torch.cat(
            [model(states[:, t - history : t]) for t in range(history, states.shape[1])], dim=1
        )
    space = read_store(folder / "heat.h5").space
    l2, h1 = RelativeL2Loss(space, reduction="none"), RelativeH1Loss(space, reduction="none")
    for j in range(truth.shape[1]):
        np.testing.assert_allclose(
            evaluation.free_l2[:, j], l2(free[:, j : j + 1], truth[:, j : j + 1]), rtol=1e-5
        )
        np.testing.assert_allclose(
            evaluation.free_h1[:, j], h1(free[:, j : j + 1], truth[:, j : j + 1]), rtol=1e-5
        )
        np.testing.assert_allclose(
            evaluation.forced_l2[:, j], l2(forced[:, j : j + 1], truth[:, j : j + 1]), rtol=1e-5
        )
    # the first step of both is the same call on the same true states
    np.testing.assert_allclose(evaluation.free_l2[:, 0], evaluation.forced_l2[:, 0], rtol=1e-6)
    np.testing.assert_allclose(evaluation.times, np.arange(history, 6) * 0.005, rtol=1e-12)
    assert evaluation.samples.tolist() == [4, 5] and evaluation.shown[1].shape == truth.shape[1:]


def test_the_summary_names_the_horizons_and_where_the_error_passes_ten_percent():
    growing = np.array([[0.01, 0.05, 0.2, 0.4]] * 2)
    evaluation = RolloutEvaluation(
        "s.h5",
        np.arange(2),
        np.arange(1, 5) * 0.1,
        growing,
        growing,
        growing / 2,
        (None, None),
        None,
    )
    assert evaluation.horizon() == 2
    lines = evaluation.summary(horizons=(1, 3))
    assert "4 steps predicted from t = 0.1 to 0.4" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "after    1 step ",
        "after    3 steps",
        "after    4 steps",
    ]
    assert "first exceeds 10 % after 3 steps" in lines[-1]
    evaluation.free_l2 = growing / 10
    assert evaluation.horizon() is None and "stays below 10 % for all 4" in evaluation.summary()[-1]


def test_a_diverged_rollout_is_never_within_ten_percent():
    errors = np.array([[0.01, 0.02, np.nan, np.nan], [0.01, 0.02, 0.03, 0.04]])
    evaluation = RolloutEvaluation(
        "s.h5", np.arange(2), np.arange(1, 5) * 0.1, errors, errors, errors, (None, None), None
    )
    assert evaluation.horizon() == 2
    lines = evaluation.summary()
    assert "1 rollout diverged (a NaN or infinite error), the first after 3 steps" in lines
    assert "first exceeds 10 % after 3 steps" in lines[-1] and "nan" in lines[-1]


def test_failed_constraint_solves_are_reported_per_trajectory(folder, monkeypatch):
    from fenop.train import trajectories

    calls = []

    def converged(model, batch):  # the third call of the model fails for its second sample
        calls.append(batch)
        return np.arange(batch) != (1 if len(calls) == 3 else -1)

    monkeypatch.setattr(trajectories, "_converged", converged)
    checkpoint = folder / "run1" / "best"
    evaluation = evaluate_rollouts(checkpoint, folder / "heat.h5", samples=slice(2, 6))
    assert calls == [4] * 10  # 5 free-running steps, then 5 teacher-forced
    assert evaluation.failed.tolist() == [3]
    assert "the hard constraint's solve failed at some step of 1 trajectory" in (
        evaluation.summary()
    )
    monkeypatch.undo()
    assert len(evaluate_rollouts(checkpoint, folder / "heat.h5").failed) == 0


def test_predicted_rollouts_start_from_the_stores_states_and_continue_in_time(folder, tmp_path):
    checkpoint = folder / "run2" / "best"
    output = predict_rollouts(
        checkpoint, folder / "heat.h5", tmp_path / "p.h5", steps=7, progress=False
    )
    store = read_store(output)
    np.testing.assert_allclose(store.times, np.arange(9) * 0.005, rtol=1e-12, atol=1e-15)
    steps = StepDataset(folder / "heat.h5", history=2, dtype=torch.float64)
    states = steps.trajectories(range(6))
    with h5py.File(output) as f:
        written = torch.from_numpy(f["u"][()])
    torch.testing.assert_close(written[:, :2], states[:, :2], rtol=0, atol=0)  # as stored
    with torch.no_grad():  # the model reads them in its own precision
        expected = rollout(load_model(checkpoint).eval(), states[:, :2].float(), 7)
    torch.testing.assert_close(written[:, 2:], expected.double(), rtol=1e-6, atol=1e-6)


def test_a_users_initial_states_need_no_time_axis_for_a_history_of_one(folder, tmp_path):
    space = read_store(folder / "heat.h5").space
    initial = tmp_path / "initial.h5"
    create_store(initial, space, fields=["u"], n_samples=2)
    write_samples(
        initial,
        0,
        {
            "u": np.stack(
                [space.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1])).numpy()]
                * 2
            )
        },
    )
    output = predict_rollouts(folder / "run1" / "best", initial, tmp_path / "p.h5", progress=False)
    store = read_store(output)
    assert store.trajectories == ("u",) and len(store.times) == 1 + 5  # the trained horizon
    with pytest.raises(StoreError, match="holds one state per sample; the model needs its last 2"):
        predict_rollouts(folder / "run2" / "best", initial, tmp_path / "q.h5", progress=False)
    assert not (tmp_path / "q.h5").exists()


def test_the_command_evaluates_plots_and_predicts_a_stepper(folder, tmp_path, capsys):
    checkpoint = str(folder / "run1" / "best")
    data = str(folder / "heat.h5")
    assert main(["info", checkpoint]) == 0
    assert "advances u from its last 1 state(s), 1 step(s) of 0.005 per call; trained on 5" in (
        capsys.readouterr().out
    )
    assert (
        main(["evaluate", checkpoint, data, "--split", "test", "--plot", str(tmp_path / "e.png")])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "2 trajectories of" in out
        and "after    5 steps" in out
        and (tmp_path / "e.png").stat().st_size > 0
    )
    assert (
        main(["predict", checkpoint, data, "-o", str(tmp_path / "p.h5"), "--steps", "3", "-q"]) == 0
    )
    assert read_store(tmp_path / "p.h5").times.shape == (4,)
    assert main(["predict", "darcy-fno", data, "-o", str(tmp_path / "q.h5"), "--steps", "3"]) == 2
    assert "--steps is for a stepper" in capsys.readouterr().err
    darcy = generate("darcy", 2, unit_square(9), seed=0, path=tmp_path / "d.h5", progress=False)
    assert main(["evaluate", checkpoint, str(darcy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("field 'u' is not a trajectory (sample, time, dof)") and "\n" not in err


def _rollout_of(path):
    """A prediction store's states ``(sample, time, dof)``, the largest change of their
    total heat over the rollout relative to ``∫|u_0|`` per sample, and its label."""
    store = read_store(path)
    with h5py.File(path) as f:
        states = f["u"][()]
    mass = store.space.mass_matrix.sum(axis=0)
    heat = mass @ states.transpose(0, 2, 1)  # (sample, time)
    drift = np.abs(heat - heat[:, :1]).max(axis=1) / (np.abs(mass) @ np.abs(states[:, 0]).T)
    return states, drift, store


def test_a_no_flux_stepper_trained_by_the_command_conserves_heat_over_a_rollout(tmp_path):
    data = tmp_path / "heat.h5"
    options = ["--option", "boundary=no_flux", "--resolution", "9", "--steps", "5"]
    assert main(["generate", "heat", "-n", "6", "--dt", "0.005", "-o", str(data), *options]) == 0
    store = read_store(data)
    assert store.header["dirichlet"] == "none" and len(store.space.boundary_dofs) == 0
    config = CONFIG.format(history=1).replace('"heat.h5"', f'"{data}"')
    config = config.replace('"run1"', f'"{tmp_path / "run"}"')
    config += '[model.constraint]\nkind = "global"\nn_basis = 4\n'
    (tmp_path / "c.toml").write_text(config)
    train_from_config(tmp_path / "c.toml", progress=False)
    checkpoint = str(tmp_path / "run" / "best")
    predict = ["predict", checkpoint, "-q", "--overwrite", "-o", str(tmp_path / "p.h5")]
    assert main([*predict, str(data), "--steps", "8"]) == 0
    states, drift, predicted = _rollout_of(tmp_path / "p.h5")
    # exact in the layer's float64, then rounded to the model's float32 each step
    assert (drift < 1e-6).all() and np.ptp(states[:, -1], axis=-1).min() > 0
    assert predicted.header["dirichlet"] == "none"  # the model's, not the input's
    # on another mesh, from a user's file (converted ones say nothing of the boundary,
    # and are labelled with Dirichlet DOFs): the model's own boundary condition holds
    assert (
        main(["generate", "heat", "-n", "2", "--resolution", "13", "-o", str(tmp_path / "o.h5")])
        == 0
    )
    assert (
        main(["convert", str(tmp_path / "o.h5"), str(tmp_path / "user.xdmf"), "--samples", "0:1"])
        == 0
    )
    assert main(["convert", str(tmp_path / "user.xdmf"), str(tmp_path / "mine.h5")]) == 0
    assert read_store(tmp_path / "mine.h5").header["dirichlet"] == "boundary"
    assert main([*predict, str(tmp_path / "mine.h5"), "--steps", "4"]) == 0
    states, drift, predicted = _rollout_of(tmp_path / "p.h5")
    assert (drift < 1e-6).all() and predicted.header["dirichlet"] == "none"
    assert np.abs(states[:, -1][:, predicted.space.mesh.boundary_nodes()]).max() > 0
