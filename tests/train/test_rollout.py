"""rollout: a stepper fed its own predictions, against the FE solver's trajectories."""

import numpy as np
import pytest
import torch

from fenop.data.pdes import AdvectionDiffusion, AllenCahn, Heat
from fenop.fem import FunctionSpace, unit_square
from fenop.operators import FNO, FEOperator, HardConstraint
from fenop.train import rollout

SPACE = FunctionSpace(unit_square(5), dirichlet="boundary")


class ExactStep(torch.nn.Module):
    """Implicit Euler steps of the heat equation by a dense solve, ``bundle`` at a
    time from the last state of the history: ``(B, m, n) -> (B, bundle, n)``."""

    def __init__(self, heat: Heat, bundle: int = 1):
        super().__init__()
        space, free = heat.space, heat.interior
        mass = torch.from_numpy(space.mass_matrix.toarray())
        system = mass + heat.dt * heat.diffusivity * torch.from_numpy(
            space.stiffness_matrix.toarray()
        )
        self.free, self.mass, self.bundle = torch.from_numpy(free), mass, bundle
        self.system = system[self.free][:, self.free]

    def forward(self, x):
        u, states = x[:, -1], []
        for _ in range(self.bundle):
            load = (u @ self.mass.T)[:, self.free]
            u = torch.zeros_like(u).index_copy(
                1, self.free, torch.linalg.solve(self.system, load.T).T
            )
            states.append(u)
        return torch.stack(states, dim=1)


def _heat_trajectories(n_steps=7, samples=3):
    heat = Heat(SPACE, t_final=0.01 * n_steps, n_steps=n_steps, trajectory=True)
    states = np.stack([heat.sample(seed=0, index=i)["u"] for i in range(samples)])
    return heat, torch.from_numpy(states)


@pytest.mark.parametrize(("history", "bundle"), [(1, 1), (2, 3), (3, 2)])
def test_an_exact_step_rolled_out_is_the_fe_trajectory(history, bundle):
    heat, states = _heat_trajectories()
    predicted = rollout(ExactStep(heat, bundle), states[:, :history], 7 - history + 1)
    assert predicted.shape == (3, 8 - history, SPACE.n_dofs)
    torch.testing.assert_close(predicted, states[:, history:], rtol=0, atol=1e-12)


def test_statics_batches_and_the_graph():
    heat, states = _heat_trajectories()
    step = ExactStep(heat)
    seen = []
    model = lambda x: (seen.append(x.shape), step(x[:, :1]))[1]  # noqa: E731
    initial = states[:, :1].clone().requires_grad_()
    statics = torch.ones(3, 2, SPACE.n_dofs, dtype=torch.float64)
    whole = rollout(model, initial, 4, statics=statics)
    assert seen[0] == (3, 3, SPACE.n_dofs) and not whole.requires_grad
    seen.clear()
    outputs = []
    parts = rollout(model, initial, 4, statics=statics, batch_size=2, after_call=outputs.append)
    assert seen[0] == (2, 3, SPACE.n_dofs) and seen[-1] == (1, 3, SPACE.n_dofs)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-15)
    # after each call, that call's output: 4 steps of each batch, in order
    assert [len(y) for y in outputs] == [2] * 4 + [1] * 4
    torch.testing.assert_close(torch.cat(outputs[4:], dim=1), whole[2:], rtol=0, atol=1e-15)
    tracked = rollout(model, initial, 4, statics=statics, grad=True)
    tracked[:, -1].sum().backward()
    assert initial.grad is not None and initial.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    states = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match=r"`states` must be \(B, m, n_dofs\), got shape \(2, 4\)"):
        rollout(lambda x: x, states[:, 0], 2)
    with pytest.raises(ValueError, match="`n_steps` must be a positive int, got 0"):
        rollout(lambda x: x, states, 0)
    with pytest.raises(ValueError, match=r"`statics` must be \(B, S, n_dofs\) = \(2, S, 4\)"):
        rollout(lambda x: x, states, 2, statics=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match=r"the model must map .* got \(2, 1, 4\) -> \(2, 4\)"):
        rollout(lambda x: x[:, 0], states, 2)


def _constrained_stepper(n_basis, history=1, family=None, **options):
    heat = family or Heat(SPACE, t_final=0.02, n_steps=2, trajectory=True)
    processor = FNO(3 + history, 1 + n_basis, n_modes=(4, 4), hidden_channels=8).double()
    model = FEOperator(
        SPACE,
        SPACE,
        processor,
        resolution=8,
        constraint=HardConstraint(heat.residual(), **options),
        # the residual takes the last state; older ones are the network's alone
        constraint_inputs=(None,) * (history - 1) + ("u_prev",),
    )
    return heat, model


@pytest.mark.parametrize("history", [1, 2])
def test_a_constraint_per_step_with_a_complete_basis_is_the_fe_trajectory(history):
    # With as many basis fields as free DOFs, the Galerkin condition of each step is
    # the implicit Euler step itself: whatever the (untrained) network emits, the
    # rollout is the solver's, and does not drift. The untrained network's 9 fields
    # are far from orthogonal (condition numbers 1e5 to 1e7), which the solve's
    # normal equations square: hence no ridge (the default 1e-12 would move it by
    # 1e-4), and a tolerance of 1e-4 of the states, where an unconstrained
    # untrained network is off by their whole size.
    torch.manual_seed(0)
    n_free = SPACE.n_dofs - len(SPACE.boundary_dofs)
    _, model = _constrained_stepper(n_free, history, ridge=0.0)
    _, states = _heat_trajectories()
    predicted = rollout(model, states[:, :history], 8 - history)
    error = (predicted - states[:, history:]).abs().max()
    assert error <= 1e-4 * states.abs().max()


@pytest.mark.parametrize("family", [AllenCahn, AdvectionDiffusion])
def test_a_constraint_per_step_of_every_dynamic_family_with_a_complete_basis(family):
    # Allen-Cahn: each step's Galerkin condition is solved by Newton on the basis
    # coefficients, against the family's own Newton on the FE system; advection-
    # diffusion: one solve of a non-symmetric system (LU, not Cholesky).
    torch.manual_seed(0)
    family = family(SPACE, t_final=1.0, n_steps=5)
    states = torch.from_numpy(np.stack([family.sample(0, i)["u"] for i in range(2)]))
    states = states * 2  # larger states, where the cubic term matters
    states = torch.from_numpy(np.stack([family.solve(u0=s[0].numpy())["u"] for s in states]))
    n_free = SPACE.n_dofs - len(SPACE.boundary_dofs)
    _, model = _constrained_stepper(n_free, family=family, ridge=0.0, tolerance=1e-12)
    predicted = rollout(model, states[:, :1], 5)
    assert bool(model.constraint.report["converged"].all())
    error = (predicted - states[:, 1:]).abs().max()
    # 4e-12 (Allen-Cahn) and 2e-8 (advection-diffusion) when written: the untrained
    # basis's conditioning (see the test above) bounds it
    assert error <= 1e-6 * states.abs().max()


def test_gradients_through_an_unrolled_constrained_rollout():
    torch.manual_seed(0)
    _, model = _constrained_stepper(3)
    _, states = _heat_trajectories(samples=1)
    initial = states[:, :1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda u: rollout(model, u, 2, grad=True), (initial,))
