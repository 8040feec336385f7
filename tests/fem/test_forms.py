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
