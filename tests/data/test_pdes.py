"""Each family's samples solve their own discrete systems, assembled here independently."""

import numpy as np
import pytest
import scipy.sparse.linalg
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.data.pdes import (
    PDES,
    AdvectionDiffusion,
    AllenCahn,
    Darcy,
    Heat,
    NonlinearDiffusion,
    Poisson,
    get_pde,
)
from fenop.fem import FunctionSpace, l_shape, unit_square
from tests.helpers import loglog_slope

SPACES = {
    "square-P1": lambda: FunctionSpace(unit_square(17), dirichlet="boundary"),
    "lshape-P1": lambda: FunctionSpace(l_shape(17), dirichlet="boundary"),
    "lshape-P2": lambda: FunctionSpace(l_shape(9), degree=2, dirichlet="boundary"),
}


def _weak_residual(name: str, basis: skfem.CellBasis, sample: dict, family) -> np.ndarray:
    """The weak residual of the family's PDE at the stored u, written from scratch."""
    u = basis.interpolate(sample["u"])
    if name == "darcy":
        a = basis.interpolate(sample["a"])
        form = skfem.LinearForm(
            lambda v, w: w["a"] * dot(grad(w["u"]), grad(v)) - family.source * v
        )
        return form.assemble(basis, u=u, a=a)
    if name == "heat":  # the last step: implicit Euler (θ = 1) or Crank-Nicolson (1/2)
        dt_k = family.dt * family.diffusivity
        theta = {"implicit_euler": 1.0, "crank_nicolson": 0.5}[family.scheme]
        form = skfem.LinearForm(
            lambda v, w: (
                (w["u"] - w["p"]) * v
                + dt_k * dot(theta * grad(w["u"]) + (1 - theta) * grad(w["p"]), grad(v))
            )
        )
        return form.assemble(basis, u=u, p=basis.interpolate(sample["u_prev"]))
    if name == "advection_diffusion":  # the last implicit Euler step, b interpolated
        dt, kappa = family.dt, family.kappa
        bx, by = (basis.interpolate(c) for c in family.velocity)
        form = skfem.LinearForm(
            lambda v, w: (
                (w["u"] - w["p"]) * v
                + dt * (w["bx"] * grad(w["u"])[0] + w["by"] * grad(w["u"])[1]) * v
                + dt * kappa * dot(grad(w["u"]), grad(v))
            )
        )
        return form.assemble(basis, u=u, p=basis.interpolate(sample["u_prev"]), bx=bx, by=by)
    if name == "allen_cahn":  # the last implicit Euler step
        dt, eps2 = family.dt, family.epsilon**2
        form = skfem.LinearForm(
            lambda v, w: (
                (w["u"] - w["p"]) * v
                + dt * eps2 * dot(grad(w["u"]), grad(v))
                + dt * (w["u"] ** 3 - w["u"]) * v
            )
        )
        return form.assemble(basis, u=u, p=basis.interpolate(sample["u_prev"]))
    f = basis.interpolate(sample["f"])
    if name == "poisson":
        form = skfem.LinearForm(lambda v, w: dot(grad(w["u"]), grad(v)) - w["f"] * v)
    else:
        form = skfem.LinearForm(
            lambda v, w: (1 + w["u"] ** 2) * dot(grad(w["u"]), grad(v)) - w["f"] * v
        )
    return form.assemble(basis, u=u, f=f)


@pytest.mark.parametrize("space_id", sorted(SPACES))
@pytest.mark.parametrize("name", sorted(PDES))
def test_samples_satisfy_their_assembled_systems(name, space_id):
    space = SPACES[space_id]()
    family = get_pde(name)(space)
    sample = family.sample(seed=5, index=3)
    assert sorted(sample) == sorted(family.fields)
    if family.trajectories:  # its last step
        states = sample["u"]
        assert states.shape == (len(family.times), space.n_dofs)
        sample = {"u": states[-1], "u_prev": states[-2]}
    free = np.setdiff1d(np.arange(space.n_dofs), space.boundary_dofs)
    residual = _weak_residual(name, space.basis, sample, family)
    # Relative to the residual of u = 0, i.e. the size of the right-hand side.
    at_zero = _weak_residual(name, space.basis, {**sample, "u": np.zeros(space.n_dofs)}, family)
    assert np.linalg.norm(residual[free]) <= 1e-10 * np.linalg.norm(at_zero[free])
    assert np.all(sample["u"][space.boundary_dofs] == 0.0)

    # The torch residual module agrees, at the solution and at a random state.
    module = family.residual()
    names = family.inputs + family.auxiliary
    if family.previous_state is not None:  # its residual is that of the last step
        names = (family.previous_state,)
    tensors = {k: torch.from_numpy(sample[k]) for k in names}
    u = torch.from_numpy(sample["u"])
    assert module(u, **tensors)[free].norm() <= 1e-10 * np.linalg.norm(at_zero[free])
    random_u = torch.randn(space.n_dofs, dtype=torch.float64)
    expected = _weak_residual(name, space.basis, {**sample, "u": random_u.numpy()}, family)
    got = module(random_u, **tensors)
    np.testing.assert_allclose(got[free].numpy(), expected[free], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[space.boundary_dofs], random_u[space.boundary_dofs])


def test_heat_trajectory_matches_an_independent_time_stepping():
    space = FunctionSpace(l_shape(9), dirichlet="boundary")
    heat = Heat(space, diffusivity=0.5, t_final=0.2, n_steps=8)
    sample = heat.sample(seed=1, index=0)
    mass = skfem.BilinearForm(lambda u, v, _: u * v).assemble(space.basis)
    stiffness = skfem.BilinearForm(lambda u, v, _: dot(grad(u), grad(v))).assemble(space.basis)
    u = sample["u0"].copy()
    for _ in range(8):
        u = skfem.solve(
            *skfem.condense(mass + 0.025 * 0.5 * stiffness, mass @ u, D=space.boundary_dofs)
        )
    np.testing.assert_allclose(sample["u"], u, rtol=0, atol=1e-12 * np.abs(u).max())
    assert np.abs(sample["u"]).max() < np.abs(sample["u0"]).max()  # heat flow decays


def test_no_flux_heat_matches_an_independent_time_stepping_and_keeps_its_mass():
    space = FunctionSpace(l_shape(9))  # no Dirichlet DOFs
    heat = Heat(space, diffusivity=0.5, t_final=0.2, n_steps=8, boundary="no_flux")
    assert Heat.dirichlet_for({"boundary": "no_flux"}) is None
    assert heat.parameters()["boundary"] == "no_flux"
    sample = heat.sample(seed=1, index=0)
    mass = skfem.BilinearForm(lambda u, v, _: u * v).assemble(space.basis)
    stiffness = skfem.BilinearForm(lambda u, v, _: dot(grad(u), grad(v))).assemble(space.basis)
    u = sample["u0"].copy()
    assert np.abs(u[space.mesh.boundary_nodes()]).max() > 0  # not set to zero there
    for _ in range(8):  # no condensation: the natural (no-flux) boundary condition
        u = scipy.sparse.linalg.spsolve(mass + 0.025 * 0.5 * stiffness, mass @ u)
    np.testing.assert_allclose(sample["u"], u, rtol=0, atol=1e-12 * np.abs(u).max())
    ones = np.ones(space.n_dofs)
    total = ones @ mass @ sample["u0"]
    np.testing.assert_allclose(ones @ mass @ sample["u"], total, rtol=1e-12)
    # the residual's sum over the DOFs is that balance, and it says so
    residual = heat.residual()
    assert residual.conserved
    assert not Heat(FunctionSpace(l_shape(9), dirichlet="boundary")).residual().conserved
    v, previous = (torch.randn(space.n_dofs, dtype=torch.float64) for _ in range(2))
    balance = residual(v, u_prev=previous).sum()
    expected = ones @ mass @ (v - previous).numpy()
    np.testing.assert_allclose(float(balance), expected, rtol=1e-10)


@pytest.mark.parametrize("scheme", ["implicit_euler", "crank_nicolson"])
def test_a_heat_trajectory_holds_every_step_of_the_final_time_map(scheme):
    space = FunctionSpace(l_shape(9), dirichlet="boundary")
    final = Heat(space, t_final=0.05, n_steps=5, scheme=scheme).sample(seed=3, index=2)
    heat = Heat(space, t_final=0.05, n_steps=5, trajectory=True, scheme=scheme)
    states = heat.sample(seed=3, index=2)
    assert heat.fields == heat.trajectories == ("u",) and states["u"].shape == (6, space.n_dofs)
    np.testing.assert_allclose(heat.times, np.linspace(0, 0.05, 6), rtol=0, atol=1e-16)
    np.testing.assert_array_equal(states["u"][0], final["u0"])
    np.testing.assert_array_equal(states["u"][-2], final["u_prev"])
    np.testing.assert_array_equal(states["u"][-1], final["u"])
    # every step, not just the last, solves the implicit Euler step assembled here
    module, free = heat.residual(), heat.interior
    for n in range(5):
        step = {"u": states["u"][n + 1], "u_prev": states["u"][n]}
        expected = _weak_residual("heat", space.basis, step, heat)
        at_zero = {**step, "u": 0 * step["u"]}
        size = np.linalg.norm(_weak_residual("heat", space.basis, at_zero, heat))
        assert np.linalg.norm(expected[free]) <= 1e-10 * size
        u, u_prev = (torch.from_numpy(step[k]) for k in ("u", "u_prev"))
        assert module(u, u_prev=u_prev)[free].norm() <= 1e-10 * size


@pytest.mark.parametrize(("scheme", "order"), [("implicit_euler", 1.0), ("crank_nicolson", 2.0)])
def test_heat_steps_converge_in_time_at_their_order(scheme, order):
    """Each scheme against the exact solution of the same space-discrete system,
    u(t) = exp(-t k M^-1 K) u0 on the free DOFs: the error is of the scheme's order
    in Δt."""
    import scipy.linalg

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    u0 = space.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(2 * np.pi * x[1])).numpy()
    free = np.setdiff1d(np.arange(space.n_dofs), space.boundary_dofs)
    mass = space.mass_matrix.toarray()[np.ix_(free, free)]
    stiffness = space.stiffness_matrix.toarray()[np.ix_(free, free)]
    exact = scipy.linalg.expm(-0.1 * 0.5 * np.linalg.solve(mass, stiffness)) @ u0[free]
    steps, errors = [8, 16, 32, 64], []
    for n in steps:
        heat = Heat(space, diffusivity=0.5, t_final=0.1, n_steps=n, scheme=scheme)
        errors.append(np.abs(heat.states(u0)[-1, free] - exact).max())
    assert abs(loglog_slope([0.1 / n for n in steps], errors) - order) <= 0.1


def test_heat_trajectories_converge_to_the_exact_solution_at_second_order():
    """u = exp(-2 π² k t) sin(πx) sin(πy), with Δt ∝ h²: the L2 error at the final
    time falls as h² (P1 in space, first order in time)."""
    k, t_final, h, errors = 0.1, 0.2, [], []
    for n in (9, 17, 33):
        space = FunctionSpace(unit_square(n), dirichlet="boundary")
        heat = Heat(space, diffusivity=k, t_final=t_final, n_steps=(n - 1) ** 2 // 8)
        u0 = space.interpolate(lambda x: np.sin(np.pi * x[0]) * np.sin(np.pi * x[1])).numpy()
        u = heat.solve(u0=u0)["u"]
        basis = skfem.Basis(space.mesh, space.basis.elem, intorder=6)
        exact = np.exp(-2 * np.pi**2 * k * t_final)  # times sin(πx) sin(πy)
        error = skfem.Functional(
            lambda w, c=exact: (w["u"] - c * np.sin(np.pi * w.x[0]) * np.sin(np.pi * w.x[1])) ** 2
        ).assemble(basis, u=basis.interpolate(u))
        h.append(1 / (n - 1))
        errors.append(np.sqrt(error))
    assert abs(loglog_slope(h, errors) - 2.0) <= 0.1


def test_allen_cahn_separates_phases_and_converges_in_time_at_first_order():
    """Against the same family at 64 times finer steps: implicit Euler's first order."""
    space = FunctionSpace(unit_square(17), dirichlet="boundary")
    u0 = AllenCahn(space).sample(seed=2, index=0)["u"][0]
    reference = AllenCahn(space, t_final=2.0, n_steps=640).solve(u0=u0)["u"][-1]
    steps, errors = [10, 20, 40], []
    for n in steps:
        u = AllenCahn(space, t_final=2.0, n_steps=n).solve(u0=u0)["u"][-1]
        errors.append(np.abs(u - reference).max())
    assert abs(loglog_slope([1 / n for n in steps], errors) - 1.0) <= 0.1
    assert np.abs(reference).max() > 1.2 * np.abs(u0).max()  # the reaction grew the phases
    assert np.abs(reference).max() < 1.0  # towards ±1, not beyond


@pytest.mark.parametrize("flow", ["rotation", "shear"])
def test_the_flows_are_divergence_free_and_carry_the_scalar(flow):
    space = FunctionSpace(unit_square(33), dirichlet="boundary")
    family = AdvectionDiffusion(space, flow=flow, kappa=1e-3, t_final=0.5, n_steps=50)
    divergence = sum(space.basis.interpolate(c).grad[i] for i, c in enumerate(family.velocity))
    assert np.abs(divergence).max() < 1e-12  # linear fields: exactly, in P1
    # a bump off the centre moves with the flow: its centre of mass after t = 0.5
    x, y = space.dof_points.T
    bump = np.exp(-((x - 0.5) ** 2 + (y - 0.3) ** 2) / 0.005)
    bump[space.boundary_dofs] = 0
    u = family.solve(u0=bump)["u"][-1]
    centre = space.dof_points.T @ u / u.sum()
    if flow == "rotation":  # one radian about (0.5, 0.5), at angular speed 2 for 0.5
        angle = -np.pi / 2 + 1.0
        expected = [0.5 + 0.2 * np.cos(angle), 0.5 + 0.2 * np.sin(angle)]
    else:  # at y = 0.3 the flow is -0.4 along x
        expected = [0.5 - 0.2, 0.3]
    np.testing.assert_allclose(centre, expected, atol=0.01)


def test_darcy_inputs_follow_the_recipe():
    space = FunctionSpace(unit_square(33), dirichlet="boundary")
    a = np.stack([Darcy(space).sample(seed=0, index=i)["a"] for i in range(20)])
    assert set(np.unique(a)) == {3.0, 12.0}
    assert 0.3 < (a == 12.0).mean() < 0.7  # a zero-mean field is non-negative about half the time


@pytest.mark.parametrize(("degree", "order"), [(1, 2.0), (2, 3.0)])
def test_darcy_solver_converges_to_a_manufactured_solution(degree, order):
    """u = sin(πx) sin(πy), a = 1 + xy, f = -div(a ∇u): L2 error of order degree + 1."""

    def exact(x):
        return np.sin(np.pi * x[0]) * np.sin(np.pi * x[1])

    def source(x):
        ux = np.pi * np.cos(np.pi * x[0]) * np.sin(np.pi * x[1])
        uy = np.pi * np.sin(np.pi * x[0]) * np.cos(np.pi * x[1])
        return -(x[1] * ux + x[0] * uy) + 2 * np.pi**2 * (1 + x[0] * x[1]) * exact(x)

    h, errors = [], []
    for n in (9, 17, 33):
        space = FunctionSpace(unit_square(n), degree=degree, dirichlet="boundary")
        family = Darcy(space, source=source)
        u = family.solve(a=space.interpolate(lambda x: 1 + x[0] * x[1]).numpy())["u"]
        basis = skfem.Basis(space.mesh, space.basis.elem, intorder=8)
        error = skfem.Functional(lambda w: (w["u"] - exact(w.x)) ** 2).assemble(
            basis, u=basis.interpolate(u)
        )
        h.append(1 / (n - 1))
        errors.append(np.sqrt(error))
    assert abs(loglog_slope(h, errors) - order) <= 0.1


def test_newton_gives_up_with_a_clear_error():
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    with pytest.raises(RuntimeError, match="Newton did not reach"):
        NonlinearDiffusion(space, max_iterations=1).sample(seed=0, index=0)


def test_families_reject_bad_arguments():
    with pytest.raises(
        ValueError, match="unknown PDE 'stokes'; known: advection_diffusion, allen_cahn, darcy"
    ):
        get_pde("stokes")
    with pytest.raises(ValueError, match="Dirichlet DOFs"):
        Poisson(FunctionSpace(unit_square(5)))
    with pytest.raises(ValueError, match="all 4 DOFs of this space lie on the Dirichlet boundary"):
        Darcy(FunctionSpace(unit_square(2), dirichlet="boundary"))
    with pytest.raises(ValueError, match="positive"):
        Darcy(FunctionSpace(unit_square(5), dirichlet="boundary"), a_low=0.0)
    with pytest.raises(ValueError, match="`trajectory` must be true or false, got 'yes'"):
        Heat(FunctionSpace(unit_square(5), dirichlet="boundary"), trajectory="yes")
    with pytest.raises(ValueError, match=r"t_final / n_steps = 1.5 must be below 1"):
        AllenCahn(FunctionSpace(unit_square(5), dirichlet="boundary"), t_final=3, n_steps=2)
    with pytest.raises(ValueError, match="`scheme` must be one of"):
        Heat(FunctionSpace(unit_square(5), dirichlet="boundary"), scheme="euler")
    with pytest.raises(ValueError, match="`boundary` must be one of"):
        Heat(FunctionSpace(unit_square(5), dirichlet="boundary"), boundary="neumann")
    with pytest.raises(ValueError, match="no-flux boundaries needs a space without Dirichlet"):
        Heat(FunctionSpace(unit_square(5), dirichlet="boundary"), boundary="no_flux")
    with pytest.raises(ValueError, match="needs a space with Dirichlet DOFs"):
        Heat(FunctionSpace(unit_square(5)))
