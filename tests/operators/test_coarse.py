"""The coarse space of the hard constraints: its products against SciPy's, and
what the layers' correction in it removes (the correction against a two-grid cycle
written in NumPy, its fixed point and its gradients are tested with the
smoothing's, in test_constraints.py)."""

import numpy as np
import pytest
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FEDecoder, FunctionSpace, MetisPartition, load_mesh, unit_square
from fenop.fem.jacobian import JacobianPattern
from fenop.operators import HardConstraint, MoEConstraint
from fenop.operators.constraints.coarse import CoarseSpace, auto_resolution
from fenop.operators.constraints.factorisation import Factorisation
from tests.helpers import PLAIN, ROOT, loglog_slope
from tests.operators.test_constraints import (
    _darcy,
    _grid_hats,
    _smooth_fields,
)


def _setup(mesh, resolution):
    space = FunctionSpace(mesh, dirichlet="boundary")
    family = get_pde("darcy")(space)
    a = torch.from_numpy(family.sample(0, 0)["a"])[None]
    residual = family.residual()
    pattern = JacobianPattern(space)
    free = ~residual.dirichlet
    coarse = CoarseSpace(pattern, free, resolution)
    values = residual.jacobian_entries(pattern, a=a)
    p = _grid_hats(space, resolution, free.numpy())
    matrix = pattern.dense(values)[0].numpy()
    return coarse, values, p, matrix


@pytest.mark.parametrize(
    ("mesh", "resolution"),
    [(unit_square(17), 5), (unit_square(17), (4, 6)), (unit_square(33), 9), ("plate", 6)],
)
def test_coarse_space_products_match_scipy(mesh, resolution):
    if mesh == "plate":  # holes: some of the grid's hats see no DOF
        mesh = load_mesh(ROOT / "tests" / "fixtures" / "plate.msh")
    coarse, values, p, matrix = _setup(mesh, resolution)
    assert coarse.size == p.shape[1]
    rng = np.random.default_rng(0)
    c = torch.from_numpy(rng.standard_normal((2, coarse.size)))
    r = torch.from_numpy(rng.standard_normal((2, p.shape[0])))
    np.testing.assert_allclose(coarse.prolong(c).numpy(), c.numpy() @ p.T, atol=1e-13)
    np.testing.assert_allclose(coarse.restrict(r).numpy(), r.numpy() @ p, atol=1e-13)
    expected = p.T @ matrix @ p
    got = coarse.matrix(values)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-11 * np.abs(expected).max())


def _darcy_coarse(batch: int):
    """Darcy on a 17 x 17 mesh, its pattern, the 5 x 5 grid's coarse space and
    ``batch`` seeded coefficients ``(batch, n)`` in [1, 2]."""
    space = FunctionSpace(unit_square(17), dirichlet="boundary")
    residual = get_pde("darcy")(space).residual()
    pattern = JacobianPattern(space)
    coarse = CoarseSpace(pattern, ~residual.dirichlet, 5)
    generator = torch.Generator().manual_seed(0)
    a = 1 + torch.rand(batch, space.n_dofs, dtype=torch.float64, generator=generator)
    return space, residual, pattern, coarse, a


def test_a_grid_of_more_hats_than_free_dofs_combines_fields_as_the_decoder_does():
    """The span of a grid's hats as the basis fields a network emits on it: the
    coefficients picked from grid values are the decoder's interpolant, and the
    products with ``Pᵀ J P`` are the dense ones."""
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    residual = get_pde("darcy")(space).residual()
    pattern, free = JacobianPattern(space), ~residual.dirichlet
    with pytest.raises(ValueError, match="they are dependent"):
        CoarseSpace(pattern, free, 12)
    grid = CoarseSpace(pattern, free, (12, 10), independent=False)
    assert grid.grid_shape == (12, 10) and grid.size > int(free.sum())
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=generator)
    decoded = FEDecoder(space, (12, 10)).double()(values)  # zero Dirichlet values
    torch.testing.assert_close(grid.prolong(grid.from_grid(values)), decoded, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"must have shape \(batch, fields, 12, 10\)"):
        grid.from_grid(values[..., :9])
    a = 1 + torch.rand(2, space.n_dofs, dtype=torch.float64, generator=generator)
    entries = grid.entries(residual.jacobian_entries(pattern, a=a))
    c = grid.from_grid(values)
    expected = c @ grid.matrix(residual.jacobian_entries(pattern, a=a)).transpose(1, 2)
    torch.testing.assert_close(grid.apply(entries, c), expected, rtol=1e-12, atol=1e-12)


def test_the_coarse_matrix_from_darcys_coefficient_is_that_of_its_entries():
    space, residual, pattern, coarse, a = _darcy_coarse(2)
    name, to_entries = residual.jacobian_map(pattern)
    expected = coarse.matrix(residual.jacobian_entries(pattern, a=a))
    torch.testing.assert_close(coarse.matrix_from(to_entries, a), expected, rtol=1e-12, atol=0)
    a.requires_grad_(True)
    assert name == "a" and torch.autograd.gradcheck(lambda a: coarse.matrix_from(to_entries, a), a)
    # the layer takes it from the input: its output as from the entries
    layer, guess = HardConstraint(residual, coarse_grid=5), torch.rand(2, 1, space.n_dofs)
    basis = _smooth_fields(space, 3, seed=0)[None].expand(2, -1, -1)
    with torch.no_grad():
        out = layer(guess, basis, a=a)
        layer.residual.jacobian_map = None  # as for a residual without the map
        torch.testing.assert_close(layer(guess, basis, a=a), out, rtol=1e-10, atol=1e-12)


def test_the_coarse_factors_from_entries_are_those_of_the_dense_matrices():
    _, residual, pattern, coarse, a = _darcy_coarse(3)
    values = residual.jacobian_entries(pattern, a=a)
    entries = coarse.entries(values)
    # a hat whose matrix entries all vanish (a dead unknown), a system not finite
    entries[1, (coarse.slot_rows == 3) | (coarse.slot_cols == 3)] = 0.0
    entries[2, 5] = float("nan")
    matrix = coarse._unpacked(entries)
    dense = Factorisation(matrix, ridge=1e-12, symmetric=True)
    rhs = torch.randn(3, coarse.size, dtype=torch.float64)
    w_dense, ok_dense = dense.solve(rhs)
    assert ok_dense.tolist() == [True, True, False]
    # in the band, block by block: symmetric by Cholesky, not by block LU
    for symmetric in (True, False):
        factors = coarse.factorised(entries, ridge=1e-12, symmetric=symmetric)
        w, ok = factors.solve(rhs)
        assert ok.tolist() == [True, True, False]
        torch.testing.assert_close(w[:2], w_dense[:2], rtol=1e-10, atol=1e-14)
        assert w[1, 3] == 0  # the dead unknown: a zero coefficient
        torch.testing.assert_close(matrix[0] @ w[0], rhs[0], rtol=1e-8, atol=1e-12)
    # differentiable, along entries that keep the systems symmetric (Cholesky reads
    # one triangle): those of Darcy's coefficient
    few = CoarseSpace(pattern, ~residual.dirichlet, 3)
    _, to_entries = residual.jacobian_map(pattern)
    b = torch.randn(1, few.size, dtype=torch.float64)

    def solved(a):
        return few.factorised(few.entries_from(to_entries, a), ridge=0.0, symmetric=True).solve(b)[
            0
        ]

    assert torch.autograd.gradcheck(solved, a[:1].clone().requires_grad_(True))


def test_the_coarse_lu_of_a_nonlinear_linearisation_is_the_dense_one():
    """Nonlinear diffusion linearised at a sample's solution: a coarse matrix that is
    not symmetric, solved by block LU in its band as by a dense LU, and its
    gradient in J's entries by gradcheck."""
    space = FunctionSpace(unit_square(17), dirichlet="boundary")
    family = get_pde("nonlinear_diffusion")(space)
    residual, sample = family.residual(), family.sample(0, 0)
    pattern = JacobianPattern(space)
    u = torch.from_numpy(sample["u"])[None]
    f = torch.from_numpy(sample["f"])[None]
    _, values = residual.linearised(pattern, u, f=f)
    coarse = CoarseSpace(pattern, ~residual.dirichlet, 5)
    entries = coarse.entries(values)
    matrix = coarse._unpacked(entries)
    assert not torch.allclose(matrix, matrix.transpose(1, 2))
    rhs = torch.randn(1, coarse.size, dtype=torch.float64)
    w, ok = coarse.factorised(entries, ridge=1e-12, symmetric=False).solve(rhs)
    expected, _ = Factorisation(matrix, ridge=1e-12, symmetric=False).solve(rhs)
    assert ok.tolist() == [True]
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-14)

    def solved(entries):
        return coarse.factorised(entries, ridge=0.0, symmetric=False).solve(rhs)[0]

    assert torch.autograd.gradcheck(solved, entries.clone().requires_grad_(True))


def test_coarse_space_rejects_a_grid_without_interior_or_finer_than_the_mesh():
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    free = torch.ones(space.n_dofs, dtype=torch.bool)
    with pytest.raises(ValueError, match="at least 3 points"):
        CoarseSpace(JacobianPattern(space), free, 2)
    with pytest.raises(ValueError, match="100 hat functions for the 81 free DOFs"):
        CoarseSpace(JacobianPattern(space), free, 10)


def _smooth_error_case(n: int):
    """Darcy on an ``n x n`` mesh, a guess whose error is one smooth mode and a basis
    of fields oscillating at 4 periods that cannot carry it; the energy error."""
    space, residual, a, u = _darcy(n)
    x, y = (torch.from_numpy(c) for c in space.dof_points.T)
    guess = u[0] + 0.1 * u.abs().max() * torch.sin(np.pi * x) * torch.sin(2 * np.pi * y)
    basis = _smooth_fields(space, 4, seed=9)[None] * torch.sin(8 * np.pi * x)
    stiffness = space.stiffness_matrix

    def energy_error(out):
        e = (out[0, 0] - u[0]).numpy()
        return float(np.sqrt(e @ stiffness @ e))

    return residual, a, guess[None, None], basis, energy_error


def test_the_coarse_grid_removes_the_smooth_error_at_first_order():
    # the energy projection onto hat functions of width H leaves an error O(H)
    residual, a, guess, basis, energy_error = _smooth_error_case(65)
    plain = energy_error(HardConstraint(residual, **PLAIN)(guess, basis, a=a))
    grids = (5, 9, 17)
    errors = [
        energy_error(HardConstraint(residual, coarse_grid=g, smoothing=0)(guess, basis, a=a))
        for g in grids
    ]
    assert errors[0] < 0.5 * plain
    assert loglog_slope([1 / (g - 1) for g in grids], errors) == pytest.approx(1.0, abs=0.15)


def test_the_experts_coarse_grid_removes_the_smooth_error():
    residual, a, guess, basis, energy_error = _smooth_error_case(33)
    plain = MoEConstraint(residual, MetisPartition(experts=8), **PLAIN)(guess, basis, a=a)
    layer = MoEConstraint(residual, MetisPartition(experts=8), coarse_grid=9, smoothing=0)
    assert energy_error(layer(guess, basis, a=a)) < 0.3 * energy_error(plain)
    assert layer.report["converged"].tolist() == [True]


@pytest.mark.parametrize(
    ("per_axis", "dim", "grid"),
    [
        *[(3, 2, 0), (7, 2, 3), (15, 2, 5), (31, 2, 9), (63, 2, 12), (127, 2, 17)],
        *[(255, 2, 24), (511, 2, 33), (1023, 2, 33)],  # 33 x 33 = 1089 hats, the cap
        *[(7, 3, 3), (15, 3, 5), (31, 3, 9), (63, 3, 10)],  # 10^3 = 1000 hats
    ],
)
def test_the_default_grid_grows_as_the_square_root_of_the_cells_per_axis(per_axis, dim, grid):
    # G - 1 = √(2 (N + 1)), at most N / 4 + 1 (small meshes) and 1089 hats; the grids
    # measured: 9 on a 33 x 33 mesh (31 x 31 free DOFs), 17 on 129 x 129, 24 on
    # 257 x 257, 33 on 513 x 513
    assert auto_resolution(per_axis**dim, dim) == grid


def test_a_layers_default_grid_is_sized_by_its_mesh():
    _, residual, _, _ = _darcy(33)
    layer = HardConstraint(residual)
    assert (layer.coarse_grid, layer.coarse_space.size) == (9, 81)
    _, small, _, _ = _darcy(5)  # 3 x 3 free DOFs: no grid
    assert HardConstraint(small).coarse_space is None


def test_the_default_two_grid_cycle_removes_more_error_than_the_solve_alone():
    # a basis that cannot carry the smooth error: the grid must; the sweeps take the
    # rough error the grid's hats cannot
    residual, a, guess, basis, energy_error = _smooth_error_case(33)
    plain = energy_error(HardConstraint(residual, **PLAIN)(guess, basis, a=a))
    default = HardConstraint(residual)
    assert (default.smoothing, default.coarse_grid) == (4, 9)
    assert energy_error(default(guess, basis, a=a)) < 0.3 * plain
    experts = MoEConstraint(residual, MetisPartition(experts=8))
    assert (experts.smoothing, experts.coarse_grid) == (4, 9)
    assert energy_error(experts(guess, basis, a=a)) < 0.3 * plain


@pytest.mark.parametrize("bad", [1, 2, -1, True, 3.0, "fine"])
def test_a_coarse_grid_without_interior_or_not_an_int_is_refused(bad):
    _, residual, _, _ = _darcy(5)
    with pytest.raises(ValueError, match="coarse_grid"):
        HardConstraint(residual, coarse_grid=bad, smoothing=0)
