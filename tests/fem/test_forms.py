import numpy as np
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.fem import FEForms, FunctionSpace, l_shape, unit_square


def test_weighted_stiffness_and_load_match_scikit_fem(rng):
    for space in (FunctionSpace(l_shape(7), degree=2), FunctionSpace(unit_square(6, cell="quad"))):
        forms = FEForms(space)
        basis = space.basis
        a = rng.uniform(1, 2, size=space.n_dofs)
        u = rng.standard_normal(space.n_dofs)
        matrix = skfem.BilinearForm(lambda p, q, w: w["a"] * dot(grad(p), grad(q))).assemble(
            basis, a=basis.interpolate(a)
        )
        flux = forms.values(torch.from_numpy(a)).unsqueeze(-3) * forms.gradients(
            torch.from_numpy(u)
        )
        np.testing.assert_allclose(forms.assemble_gradient(flux).numpy(), matrix @ u, atol=1e-12)
        load = skfem.LinearForm(lambda q, w: w["a"] * q).assemble(basis, a=basis.interpolate(a))
        ours = forms.assemble_values(forms.values(torch.from_numpy(a))).numpy()
        np.testing.assert_allclose(ours, load, atol=1e-13)


def test_values_and_gradients_match_scikit_fem_interpolation(rng):
    space = FunctionSpace(l_shape(5), degree=2)
    forms = FEForms(space)
    u = rng.standard_normal(space.n_dofs)
    field = space.basis.interpolate(u)
    np.testing.assert_allclose(
        forms.values(torch.from_numpy(u)).numpy(), np.asarray(field), atol=1e-13
    )
    np.testing.assert_allclose(forms.gradients(torch.from_numpy(u)).numpy(), field.grad, atol=1e-12)


def test_batched_and_differentiable():
    space = FunctionSpace(unit_square(4))
    forms = FEForms(space)
    u = torch.randn(2, 3, space.n_dofs, dtype=torch.float64, requires_grad=True)

    def nonlinear(u):
        return forms.assemble_gradient(
            (1 + forms.values(u) ** 2).unsqueeze(-3) * forms.gradients(u)
        )

    assert nonlinear(u).shape == (2, 3, space.n_dofs)
    torch.testing.assert_close(nonlinear(u)[1, 2], nonlinear(u[1, 2]))
    assert torch.autograd.gradcheck(nonlinear, (u,))


def test_a_subset_of_cells_assembles_their_contributions_alone(rng):
    # -div((1 + u²) ∇u) - f on the cells left of x = 0.5 and on the others: the two
    # add up to the whole assembly, and the left part is exact where every cell of a
    # DOF is on the left
    space = FunctionSpace(l_shape(7), degree=2)
    forms = FEForms(space)
    u, f = (torch.from_numpy(rng.standard_normal((2, space.n_dofs))) for _ in range(2))

    def residual(u, f):
        flux = (1 + forms.values(u) ** 2).unsqueeze(-3) * forms.gradients(u)
        return forms.assemble_gradient(flux) - forms.assemble_values(forms.values(f))

    centres = space.mesh.p[:, space.mesh.t].mean(axis=1)
    left = np.flatnonzero(centres[0] < 0.5)
    right = np.setdiff1d(np.arange(space.mesh.t.shape[1]), left)
    whole = residual(u, f)
    with forms.on(forms.subset(left)):
        on_left = residual(u, f)
        assert forms.values(u).shape == (2, len(left), forms.cells.value_shape[1])
    with forms.on(forms.subset(right)):
        on_right = residual(u, f)
    torch.testing.assert_close(on_left + on_right, whole, rtol=1e-12, atol=1e-12)
    dofs = space.basis.element_dofs
    inside = np.setdiff1d(np.unique(dofs[:, left]), np.unique(dofs[:, right]))
    assert len(inside) > 10
    torch.testing.assert_close(on_left[:, inside], whole[:, inside], rtol=1e-12, atol=1e-12)
    assert forms.values(u).shape[-2] == space.mesh.t.shape[1]  # the context has ended
