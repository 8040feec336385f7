"""CellJacobian: Jacobians assembled cell by cell, against dense assemblies of the
local matrices in NumPy; cell-constant weights, rank-one local matrices and their
gradients; the nonlinear residual's cell-wise linearisation against its general one."""

import numpy as np
import pytest
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, unit_cube
from fenop.fem.cell_jacobian import CellJacobian
from fenop.fem.jacobian import JacobianPattern
from tests.fem.test_jacobian import SPACES as PATTERN_SPACES

# the pattern's spaces, and a 3D one
SPACES = {**PATTERN_SPACES, "P1 cube": lambda: FunctionSpace(unit_cube(3), dirichlet="boundary")}


def _cells(name):
    space = SPACES[name]()
    pattern = JacobianPattern(space)
    return space, pattern, CellJacobian(pattern, torch.device("cpu"))


def _dense_sum_of_locals(space, local: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``Σ_e P_eᵀ L_e P_e`` for local matrices ``(N, N, E')`` of ``cells``, by a loop."""
    dofs = space.basis.element_dofs[:, cells]
    dense = np.zeros((space.n_dofs, space.n_dofs))
    for e in range(len(cells)):
        dense[np.ix_(dofs[:, e], dofs[:, e])] += local[:, :, e]
    return dense


@pytest.mark.parametrize("name", SPACES)
def test_gradients_are_constant_on_p1_simplices_only(name):
    _, _, cells = _cells(name)
    assert cells.constant_gradients == name.startswith("P1")
    if not cells.constant_gradients:
        with pytest.raises(ValueError, match="not constant"):
            cells.constant_basis(cells.every)


@pytest.mark.parametrize("name", SPACES)
def test_cell_constant_weights_are_weights_repeated_at_the_points(name):
    space, _, cells = _cells(name)
    rng = np.random.default_rng(0)
    chosen = torch.from_numpy(np.sort(rng.choice(cells.n_cells, cells.n_cells // 2, replace=False)))
    for index in (cells.every, chosen):
        weights = torch.from_numpy(rng.standard_normal((2, 2, len(index), 1)))
        n_points = space.basis.dx.shape[1]
        names = ("stiffness", "mass")
        expected = cells.weighted(weights.expand(-1, -1, -1, n_points), names, index)
        constant = cells.weighted(weights, names, index)
        torch.testing.assert_close(constant, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SPACES)
def test_rank_one_local_matrices_are_outer_products_summed_over_cells(name):
    space, pattern, cells = _cells(name)
    rng = np.random.default_rng(1)
    n_local = space.basis.element_dofs.shape[0]
    chosen = np.sort(rng.choice(cells.n_cells, cells.n_cells // 3, replace=False))
    for subset in (np.arange(cells.n_cells), chosen):
        left, right = rng.standard_normal((2, 2, n_local, len(subset)))
        entries = cells.rank_one(
            torch.from_numpy(left), torch.from_numpy(right), torch.from_numpy(subset)
        )
        for b in range(2):
            local = left[b][:, None] * right[b][None]  # (N, N, E')
            expected = _dense_sum_of_locals(space, local, subset)
            np.testing.assert_allclose(pattern.dense(entries)[b].numpy(), expected, atol=1e-12)


def test_rank_one_gradients():
    *_, cells = _cells("P1 L-shape")
    rng = np.random.default_rng(2)
    subset = torch.from_numpy(np.sort(rng.choice(cells.n_cells, 20, replace=False)))
    left, right = (
        torch.from_numpy(rng.standard_normal((2, 3, 20))).requires_grad_() for _ in range(2)
    )
    assert torch.autograd.gradcheck(lambda x, y: cells.rank_one(x, y, subset), (left, right))
    with pytest.raises(ValueError, match="shape"):
        cells.rank_one(left[:, :2], right, subset)


@pytest.mark.parametrize("name", ["P1 L-shape", "P1 cube"])
def test_local_values_and_their_assembly(name):
    space, _, cells = _cells(name)
    rng = np.random.default_rng(3)
    u = torch.from_numpy(rng.standard_normal((2, space.n_dofs)))
    subset = np.sort(rng.choice(cells.n_cells, cells.n_cells // 2, replace=False))
    index = torch.from_numpy(subset)
    dofs = space.basis.element_dofs[:, subset]
    local = cells.local_values(u, index)
    torch.testing.assert_close(local, u[:, torch.from_numpy(dofs)], rtol=0, atol=0)
    expected = np.zeros((2, space.n_dofs))
    for b in range(2):
        np.add.at(expected[b], dofs.ravel(), local[b].numpy().ravel())
    np.testing.assert_allclose(cells.assemble(local, index).numpy(), expected, atol=1e-12)
    # the constant basis: Σ_j ∇φ_i·∇φ_j = 0 (the constant's gradient) and Σ_q dx = |e|
    phi, dx, products = cells.constant_basis(index)
    np.testing.assert_allclose(products.sum(1).numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(phi.sum(0).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(dx.sum(0).numpy(), space.basis.dx[subset].sum(1), atol=0)


@pytest.mark.parametrize("name", ["P1 L-shape", "P1 cube"])
def test_cell_wise_nonlinear_linearisation_is_the_general_one(name):
    # nonlinear diffusion on P1: the cell-wise R and J (and their gradients in u and
    # f) against the general assembly from the weights at the quadrature points
    space = SPACES[name]()
    pattern = JacobianPattern(space)
    family = get_pde("nonlinear_diffusion")(space)
    fast, general = family.residual(), family.residual()
    general.cell_jacobian(pattern, torch.device("cpu")).constant_gradients = False
    rng = np.random.default_rng(4)
    u, f = (torch.from_numpy(rng.standard_normal((2, space.n_dofs))) for _ in range(2))
    subset = np.sort(rng.choice(space.mesh.t.shape[1], space.mesh.t.shape[1] // 2, replace=False))
    shapes = ((2, space.n_dofs), (2, pattern.nnz))
    weights = [torch.from_numpy(rng.standard_normal(shape)) for shape in shapes]
    for cells in (None, subset):
        outs = []
        for residual in (fast, general):
            x, y = u.clone().requires_grad_(), f.clone().requires_grad_()
            if cells is None:
                r, entries = residual.linearised(pattern, x, f=y)
            else:
                with residual.forms.on(residual.forms.subset(cells)):
                    r, entries = residual.linearised(pattern, x, f=y)
            functional = (r * weights[0]).sum() + (entries * weights[1]).sum()
            outs.append((r, entries, *torch.autograd.grad(functional, (x, y))))
        for got, expected in zip(*outs, strict=True):
            scale = float(expected.detach().abs().max())
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * scale)
