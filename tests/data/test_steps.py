"""StepDataset: the windows of a trajectory store, and the stepper's statistics."""

import h5py
import numpy as np
import pytest
import torch

from fenop.data import StepDataset, StoreError, generate
from fenop.data.store import create_store, write_samples
from fenop.fem import FunctionSpace, l_shape


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 samples of a static field ``a`` and a trajectory ``u`` of 6 states, whose
    values say where they come from: u[i, t] = 100 i + t (plus the DOF / 1000)."""
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    path = tmp_path_factory.mktemp("steps") / "s.h5"
    create_store(
        path, space, fields=["u", "a"], n_samples=4, times=np.arange(6) * 0.1, trajectories=["u"]
    )
    dof = np.arange(space.n_dofs) / 1000
    u = 100 * np.arange(4)[:, None, None] + np.arange(6)[None, :, None] + dof
    write_samples(path, 0, {"u": u, "a": -1 - np.arange(4)[:, None] + dof})
    return path, space, u


def test_windows_hold_the_history_then_the_statics_and_the_next_states(store):
    path, space, u = store
    steps = StepDataset(path, statics=["a"], history=2, bundle=2, indices=[1, 3])
    assert steps.windows == 3 and len(steps) == 6 and steps.dt == pytest.approx(0.1)
    x, y = steps[4]  # sample 3, window 1
    assert x.shape == (3, space.n_dofs) and y.shape == (2, space.n_dofs)
    assert x[:, 0].tolist() == [301.0, 302.0, -4.0] and y[:, 0].tolist() == [303.0, 304.0]
    torch.testing.assert_close(
        steps.trajectories([1]), torch.as_tensor(u[3:4], dtype=torch.float32)
    )
    assert steps.static_fields([0, 1])[:, 0, 0].tolist() == [-2.0, -4.0]
    short = StepDataset(path, horizon=3)
    assert short.windows == 3 and short.trajectories([0]).shape == (1, 4, space.n_dofs)


def test_one_set_of_statistics_for_the_state_in_every_channel(store):
    path, space, u = store
    steps = StepDataset(path, statics=["a"], history=2, bundle=3)
    inputs, outputs = steps.normalizers()
    weights = space.mass_matrix.sum(axis=0)
    weights = weights / weights.sum()
    mean = (u.reshape(-1, space.n_dofs) @ weights).mean()
    std = np.sqrt(((u.reshape(-1, space.n_dofs) ** 2) @ weights).mean() - mean**2)
    assert inputs.mean.shape == (3,) and outputs.mean.shape == (3,)
    np.testing.assert_allclose(inputs.mean[:2].numpy(), [mean, mean], rtol=1e-12)
    np.testing.assert_allclose(outputs.std.numpy(), [std] * 3, rtol=1e-12)
    assert inputs.mean[2] < 0  # the static field's own


def test_a_trajectory_too_short_or_a_static_state_is_refused_in_one_line(store, tmp_path):
    path = store[0]
    with pytest.raises(StoreError, match=r"trajectories of 6 states are too short for a history "):
        StepDataset(path, history=4, bundle=3)
    with pytest.raises(StoreError, match=r"field 'a' is not a trajectory"):
        StepDataset(path, state="a")
    with pytest.raises(StoreError, match=r"field 'u' is a trajectory; static inputs are"):
        StepDataset(path, state="u", statics=["u"])
    with pytest.raises(ValueError, match=r"`history` must be a positive int, got 0"):
        StepDataset(path, history=0)
    with pytest.raises(ValueError, match=r"`horizon` must lie in \[1, 5\]"):
        StepDataset(path, horizon=6)
    uneven = tmp_path / "uneven.h5"
    with h5py.File(path) as f, h5py.File(uneven, "w") as g:
        for name in ("mesh_points", "mesh_cells", "u"):
            g[name] = f[name][()]
        g["time"] = [0.0, 0.1, 0.2, 0.4, 0.5, 0.6]
        g.attrs["fenop_format"], g.attrs["element"] = 1, "P1"
    with pytest.raises(ValueError, match="not evenly spaced"):
        _ = StepDataset(uneven).dt


def test_heat_windows_step_the_generated_trajectories(tmp_path):
    from fenop.fem import unit_square

    path = generate(
        "heat",
        2,
        unit_square(9),
        seed=0,
        path=tmp_path / "h.h5",
        progress=False,
        n_steps=4,
        trajectory=True,
    )
    steps = StepDataset(path, dtype=torch.float64)
    assert len(steps) == 8
    x, y = steps[5]
    whole = steps.trajectories([1])[0]
    torch.testing.assert_close(x[0], whole[1])
    torch.testing.assert_close(y[0], whole[2])


def test_unrolled_windows_hold_the_targets_of_every_call(store):
    steps = StepDataset(store[0], history=2, bundle=1)
    chained = steps.unrolled(3)
    assert (steps.windows, chained.windows) == (4, 2) and steps.unroll == 1
    x, y = chained[1]  # sample 0, window 1
    assert x[:, 0].tolist() == [1.0, 2.0] and y[:, 0].tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(StoreError, match="too short for a history of 2 and 5 predicted"):
        steps.unrolled(5)
