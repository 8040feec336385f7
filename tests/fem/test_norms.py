import math

import numpy as np
import pytest
import skfem
import torch

from fenop.fem import (
    FunctionSpace,
    RelativeH1Loss,
    RelativeL2Loss,
    h1_norm,
    l2_norm,
    l_shape,
    unit_square,
)
from tests.helpers import loglog_slope


def _distorted_square(n: int, rng: np.random.Generator) -> skfem.MeshTri1:
    """A non-uniform mesh of the unit square: interior vertices jittered by up to h/4."""
    mesh = unit_square(n)
    p = mesh.p.copy()
    interior = np.ones(p.shape[1], dtype=bool)
    interior[mesh.boundary_nodes()] = False
    p[:, interior] += rng.uniform(-0.25, 0.25, size=(2, interior.sum())) / (n - 1)
    return skfem.MeshTri(p, mesh.t)


def test_norms_are_exact_integrals_on_a_non_uniform_mesh(rng):
    # u = 1 + x - 2y is in P1; ∫ u^2 and ∫ |∇u|^2 over the unit square in closed form.
    space = FunctionSpace(_distorted_square(9, rng))
    u = space.interpolate(lambda x: 1 + x[0] - 2 * x[1])
    l2_squared = 1 + 1 / 3 + 4 / 3 + 2 * (1 / 2) - 4 * (1 / 2) - 4 * (1 / 4)  # = 2/3
    assert l2_norm(u, space).item() ** 2 == pytest.approx(l2_squared, abs=1e-12)
    assert h1_norm(u, space, seminorm=True).item() ** 2 == pytest.approx(5.0, abs=1e-12)
    assert h1_norm(u, space).item() ** 2 == pytest.approx(l2_squared + 5.0, abs=1e-12)


def test_p2_norms_are_exact_for_quadratics_on_the_l_shape():
    # u = x^2 - y, u^2 = x^4 - 2x^2 y + y^2, |∇u|^2 = 4x^2 + 1: integrate each term over
    # (-1, 1)^2 and subtract the removed quadrant (0, 1) x (-1, 0).
    space = FunctionSpace(l_shape(5), degree=2)
    u = space.interpolate(lambda x: x[0] ** 2 - x[1])
    square = 2 * (2 / 5) + 0 + 2 * (2 / 3)
    quadrant = (1 / 5) * 1 - 2 * (1 / 3) * (-1 / 2) + 1 * (1 / 3)
    assert l2_norm(u, space).item() ** 2 == pytest.approx(square - quadrant, abs=1e-12)
    grad_square = 4 * (2 / 3) * 2 + 4
    grad_quadrant = 4 / 3 + 1
    assert h1_norm(u, space, seminorm=True).item() ** 2 == pytest.approx(
        grad_square - grad_quadrant, abs=1e-12
    )


def _f(x):
    return np.sin(np.pi * x[0]) * np.cos(np.pi * x[1] / 2) + x[0] ** 2


def _grad_f(x):
    return (
        np.pi * np.cos(np.pi * x[0]) * np.cos(np.pi * x[1] / 2) + 2 * x[0],
        -np.pi / 2 * np.sin(np.pi * x[0]) * np.sin(np.pi * x[1] / 2),
    )


@pytest.mark.parametrize(
    ("degree", "order"),
    # P1: the interpolation error has a non-zero mean, so the norm is off by O(h^2).
    # P2: a priori O(h^3); on these symmetric structured meshes the cubic terms cancel
    # between neighbouring triangles and the observed order is 4.
    [(1, 2.0), (2, 4.0)],
)
def test_norms_of_interpolants_converge_to_the_exact_norms(degree, order):
    h, l2_errors, h1_errors = [], [], []
    for n in (9, 17, 33):
        space = FunctionSpace(l_shape(n), degree=degree)
        u = space.interpolate(_f)
        basis = skfem.Basis(space.mesh, space.basis.elem, intorder=10)
        l2 = np.sqrt(skfem.Functional(lambda w: _f(w.x) ** 2).assemble(basis))
        h1 = np.sqrt(skfem.Functional(lambda w: sum(g**2 for g in _grad_f(w.x))).assemble(basis))
        h.append(2 / (n - 1))
        l2_errors.append(abs(l2_norm(u, space).item() - l2) / l2)
        h1_errors.append(abs(h1_norm(u, space, seminorm=True).item() - h1) / h1)
    assert abs(loglog_slope(h, l2_errors) - order) <= 0.1
    assert abs(loglog_slope(h, h1_errors) - order) <= 0.1


def test_relative_losses_and_reductions(rng):
    space = FunctionSpace(_distorted_square(7, rng), degree=2)
    target = torch.randn(3, 2, space.n_dofs, dtype=torch.float64)
    scale = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)[:, None, None]
    pred = target * (1 + scale)
    per_sample = RelativeL2Loss(space, reduction="none")(pred, target)
    torch.testing.assert_close(per_sample, scale.flatten())
    torch.testing.assert_close(RelativeL2Loss(space)(pred, target), scale.mean())
    torch.testing.assert_close(RelativeL2Loss(space, reduction="sum")(pred, target), scale.sum())
    torch.testing.assert_close(
        RelativeH1Loss(space, reduction="none")(pred, target), scale.flatten()
    )

    # Against the definition with the matrices themselves.
    e, u = (pred - target)[0], target[0]
    m, k = space.mass.to_dense(), space.stiffness.to_dense()
    expected = torch.sqrt(
        torch.einsum("ci,ij,cj->", e, m + k, e) / torch.einsum("ci,ij,cj->", u, m + k, u)
    )
    torch.testing.assert_close(RelativeH1Loss(space, reduction="none")(pred, target)[0], expected)


def test_losses_are_differentiable_and_finite_at_zero_error():
    space = FunctionSpace(unit_square(4), dirichlet="boundary")
    target = torch.randn(2, 1, space.n_dofs, dtype=torch.float64)
    pred = torch.randn(2, 1, space.n_dofs, dtype=torch.float64, requires_grad=True)
    for loss in (
        RelativeL2Loss(space),
        RelativeH1Loss(space),
        RelativeH1Loss(space, seminorm=True),
    ):
        assert torch.autograd.gradcheck(lambda p, loss=loss: loss(p, target), (pred,))
        exact = target.clone().requires_grad_(True)
        loss(exact, target).backward()
        assert torch.isfinite(exact.grad).all() and (exact.grad == 0).all()


def test_losses_reject_mismatched_input():
    space = FunctionSpace(unit_square(4))
    loss = RelativeL2Loss(space)
    with pytest.raises(ValueError, match=r"`pred` must have 16 DOFs.*\(2, 1, 25\)"):
        loss(torch.zeros(2, 1, 25), torch.zeros(2, 1, 16))
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.zeros(2, 1, 16), torch.zeros(3, 1, 16))
    with pytest.raises(ValueError, match=r"\(batch, channels, n_dofs\)"):
        loss(torch.zeros(16), torch.zeros(16))
    with pytest.raises(ValueError, match="reduction"):
        RelativeL2Loss(space, reduction="max")


def test_nan_and_inf_are_never_scored_as_zero_error():
    # A diverged model emits NaN (or Inf): every norm and loss must carry it through,
    # never turn it into a perfect score.
    space = FunctionSpace(unit_square(4), dirichlet="boundary")
    target = torch.randn(2, 1, space.n_dofs, dtype=torch.float64)
    for bad in (math.nan, math.inf):
        pred = target.clone()
        pred[0, 0, 3] = bad  # sample 0 broken, sample 1 exact
        for loss in (
            RelativeL2Loss(space, reduction="none"),
            RelativeH1Loss(space, reduction="none"),
        ):
            errors = loss(pred, target)
            assert not torch.isfinite(errors[0]) and errors[1] == 0
        assert torch.isnan(l2_norm(pred[0, 0] * math.nan, space))
        assert torch.isnan(h1_norm(pred[0, 0] * math.nan, space))
    assert torch.isnan(RelativeL2Loss(space)(target * math.nan, target))
