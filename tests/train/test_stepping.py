"""Training steppers: the modes' gradients, the noise, and a configuration run end to
end (train, reload, roll out) with and without the constraint per step."""

import json

import numpy as np
import pytest
import torch

from fenop.data import StepDataset, generate
from fenop.fem import RelativeL2Loss, unit_square
from fenop.train import load_model, rollout
from fenop.train.config import ConfigError
from fenop.train.run import train_from_config
from fenop.train.stepping import step_prediction


class Scale(torch.nn.Module):
    """``θ`` times the last state: a stepper with one weight."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x):
        return self.theta * x[:, -1:]


@pytest.mark.parametrize(
    ("mode", "derivative"),
    [
        ("one_step", lambda t: 1.0),  # d(θ x)/dθ
        ("pushforward", lambda t: t**2),  # θ (θ² x), the inner calls without gradient
        ("unrolled", lambda t: 3 * t**2),  # d(θ³ x)/dθ, through every call
    ],
)
def test_each_mode_differentiates_through_the_calls_it_trains(mode, derivative):
    # pushforward with its default, the most calls ahead (unroll - 1)
    model, x = Scale(0.7), torch.ones(1, 1, 1, dtype=torch.float64)
    y = torch.zeros(1, 3, 1, dtype=torch.float64)
    prediction, target = step_prediction(model, x, y, history=1, mode=mode, unroll=3)
    prediction[:, -1].sum().backward()
    assert model.theta.grad.item() == pytest.approx(derivative(0.7), rel=1e-12)
    assert target.shape == prediction.shape


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_pushforward_scores_the_call_after_the_ones_ahead(ahead):
    model, x = Scale(0.5), torch.ones(1, 1, 1, dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[None, :, None]
    prediction, target = step_prediction(
        model, x, y, history=1, mode="pushforward", unroll=3, ahead=ahead
    )
    assert prediction.item() == 0.5 ** (ahead + 1) and target.item() == ahead + 1
    prediction.sum().backward()
    assert model.theta.grad.item() == pytest.approx(0.5**ahead)  # the last call only
    with pytest.raises(ValueError, match=r"`ahead` must lie in \[0, 2\], got 3"):
        step_prediction(model, x, y, history=1, mode="pushforward", unroll=3, ahead=3)


CONFIG = """
[data]
path = "heat.h5"
state = "u"
history = {history}
n_train = 6
n_test = 2

[model]
processor = "fno"
resolution = 8
[model.options]
n_modes = [4, 4]
hidden_channels = 8
{constraint}
[training]
epochs = 2
batch_size = 8
output = "{name}"
device = "cpu"
mode = "{mode}"
unroll = {unroll}
noise = {noise}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steppers")
    generate(
        "heat",
        8,
        unit_square(9),
        seed=0,
        path=folder / "heat.h5",
        progress=False,
        n_steps=6,
        t_final=0.03,
        trajectory=True,
    )
    return folder


def _write(folder, name, *, mode="one_step", unroll=1, noise=0.0, history=1, constraint=""):
    path = folder / f"{name}.toml"
    path.write_text(
        CONFIG.format(
            name=name, mode=mode, unroll=unroll, noise=noise, history=history, constraint=constraint
        )
    )
    return path


@pytest.mark.parametrize(
    ("mode", "unroll", "noise", "history", "constraint"),
    [
        ("one_step", 1, 0.0, 1, ""),
        ("pushforward", 3, 0.05, 2, ""),
        ("unrolled", 2, 0.0, 1, '[model.constraint]\nkind = "global"\nn_basis = 4'),
    ],
    ids=["teacher forcing", "pushforward with noise", "unrolled, constrained"],
)
def test_a_stepper_trains_from_a_configuration_and_rolls_out(
    folder, mode, unroll, noise, history, constraint
):
    name = f"{mode}-{history}"
    metrics = train_from_config(
        _write(
            folder,
            name,
            mode=mode,
            unroll=unroll,
            noise=noise,
            history=history,
            constraint=constraint,
        ),
        progress=False,
    )
    assert len(metrics) == 2 and all(np.isfinite(m["test_l2"]) for m in metrics)
    config = json.loads((folder / name / "best" / "config.json").read_text())
    stepper = config["data"]["stepper"]
    assert stepper["history"] == history and stepper["dt"] == pytest.approx(0.005)
    assert config["training"]["mode"] == mode and config["training"]["unroll"] == unroll
    model = load_model(folder / name / "best").double()
    assert (model.constraint is not None) == bool(constraint)
    test = StepDataset(folder / "heat.h5", history=history, indices=[6, 7], dtype=torch.float64)
    states = test.trajectories([0, 1])
    predicted = rollout(model.eval(), states[:, :history], 6 - history + 1)
    assert predicted.shape == states[:, history:].shape and torch.isfinite(predicted).all()
    # the recorded test error is that of one call from true states, on every window
    windows = [test[i] for i in range(len(test))]
    x, y = (torch.stack(t) for t in zip(*windows, strict=True))
    with torch.no_grad():
        one_step = RelativeL2Loss(test.space)(model(x), y)
    assert one_step.item() == pytest.approx(config["test_error"], rel=1e-4)
    if constraint:  # each step's Galerkin condition, from the state before it
        residual = model.constraint.residual
        previous = torch.cat([states[:, :1], predicted[:, :-1]], dim=1)
        r = residual(predicted[0], u_prev=previous[0])
        scale = residual(torch.zeros_like(predicted[0]), u_prev=previous[0]).norm()
        assert torch.isfinite(r).all() and r.norm() < scale  # not exact: 4 basis fields


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "unrolled", "unroll": 9}, r"too short for a history of 1 and 9 predicted"),
        ({"history": 7}, r"too short for a history of 7"),
    ],
)
def test_a_trajectory_too_short_for_the_training_is_one_line(folder, change, message):
    with pytest.raises(Exception, match=message) as info:
        train_from_config(_write(folder, "short", **change), progress=False)
    assert "heat.h5" in str(info.value) and "\n" not in str(info.value)
    assert not (folder / "short").exists()


def test_stepper_keys_without_a_state_are_refused(folder):
    path = folder / "static.toml"
    path.write_text(
        CONFIG.replace('state = "u"\n', "").format(
            name="x", mode="pushforward", unroll=2, noise=0.0, history=1, constraint=""
        )
    )
    with pytest.raises(ConfigError, match=r"data.history is for a stepper: give data.state"):
        train_from_config(path, progress=False)


def test_the_noise_of_a_sample_does_not_depend_on_the_share_of_the_batch(folder):
    from fenop.operators import FNO, FEOperator
    from fenop.train import Trainer

    steps = StepDataset(folder / "heat.h5", history=2, indices=range(6))
    space = steps.space
    model = FEOperator(
        space,
        space,
        FNO(5, 1, n_modes=(4, 4), hidden_channels=8),
        resolution=8,
        input_stats=([0.0, 0.0], [2.0, 2.0]),
    )
    trainer = Trainer(model, steps, steps, epochs=1, noise=0.1, progress=False)
    x = torch.zeros(4, 2, space.n_dofs)
    whole = trainer._noise([5, 9, 2, 7], [5, 9, 2, 7], x)
    share = trainer._noise([5, 9, 2, 7], [2, 7], x[:2])
    torch.testing.assert_close(share, whole[2:], rtol=0, atol=0)
    assert 0.15 < whole.std().item() < 0.25  # noise 0.1 of the state's deviation, 2
    with pytest.raises(ValueError, match="`mode` and `noise` train a stepper"):
        Trainer(model, _StaticSet(), steps, epochs=1, noise=0.1, progress=False)


class _StaticSet(torch.utils.data.Dataset):
    def __len__(self):
        return 1


def test_the_soft_constraint_of_a_stepper_is_its_step_residual(folder):
    from fenop.data.pdes import Heat
    from fenop.train.physics import PhysicsLoss

    steps = StepDataset(folder / "heat.h5", history=2, dtype=torch.float64)
    x, y = (torch.stack(t) for t in zip(*[steps[i] for i in range(4)], strict=True))
    heat = Heat(steps.space, t_final=0.03, n_steps=6)
    loss = PhysicsLoss(heat.residual(), [None, "u_prev"])
    assert loss(y, x).item() < 1e-10  # the data's own next states: zero residual
    assert loss(x[:, :1], x).item() > 1e-2  # the previous state again: not a step
    path = folder / "soft.toml"
    path.write_text(
        CONFIG.format(name="soft", mode="one_step", unroll=1, noise=0.0, history=2, constraint="")
        + "physics_weight = 0.5\n"
    )
    metrics = train_from_config(path, progress=False)
    assert all(np.isfinite(m["test_l2"]) for m in metrics)
    config = json.loads((folder / "soft" / "best" / "config.json").read_text())
    assert config["training"]["physics_weight"] == 0.5
    path.write_text(path.read_text().replace('mode = "one_step"', 'mode = "pushforward"'))
    with pytest.raises(ConfigError, match="physics_weight is added to one-step training"):
        train_from_config(path, progress=False)
