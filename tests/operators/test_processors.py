"""The grid processors and FEMultigrid on their own: shapes, sizes, gradients, dtypes."""

import pytest
import torch

from fenop.fem import FunctionSpace, hierarchy, l_shape, load_mesh, unit_square
from fenop.operators import FNO, LSM, FEMultigrid, MgNO
from fenop.operators.fe_multigrid import _StencilOperator, _stencils
from fenop.operators.mgno import MgConv, grid_levels
from tests.helpers import write_unstructured_square


def _all_parameters_get_gradients(model, x):
    model(x).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: FNO(3, 2, n_modes=(6, 6), hidden_channels=8), (2, 3, 17, 23)),
        (lambda: FNO(3, 2, n_modes=(4,), hidden_channels=8), (2, 3, 30)),
        (lambda: MgNO(3, 2, grid=(17, 23), width=6, n_layers=2), (2, 3, 17, 23)),
        (lambda: MgNO(3, 2, grid=(9, 9, 9), width=4, n_layers=1), (2, 3, 9, 9, 9)),
        (lambda: MgNO(3, 2, grid=(64,), width=4, n_layers=1, padding="circular"), (2, 3, 64)),
        (lambda: LSM(3, 2, width=8, depth=3), (2, 3, 17, 23)),
    ],
    ids=["fno-2d", "fno-1d", "mgno-2d-odd", "mgno-3d", "mgno-1d-periodic", "lsm-odd"],
)
def test_grid_processors_shapes_and_gradients(make, shape):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    assert model(x).shape == (shape[0], 2, *shape[2:])
    _all_parameters_get_gradients(model, x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FNO(2, 1, n_modes=(4, 4), hidden_channels=4, n_layers=1),
        lambda: MgNO(2, 1, grid=(8, 8), width=3, n_layers=1),
        lambda: LSM(2, 1, width=4, depth=2, heads=2, n_tokens=2, n_basis=3),
    ],
    ids=["fno", "mgno", "lsm"],
)
def test_grid_processors_in_float64_pass_gradcheck(make):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    assert model(x).dtype == torch.float64
    assert torch.autograd.gradcheck(model, (x,), fast_mode=True)


@pytest.mark.parametrize("shape", [(24, 24), (25, 19)])
def test_fno_float64_path_computes_what_neuraloperator_computes_in_float32(shape):
    torch.manual_seed(0)
    model = FNO(3, 2, n_modes=(8, 8), hidden_channels=16)
    x = torch.randn(2, 3, *shape)
    single = model(x).double()
    double = model.double()(x.double())
    # Same weights, same operations; only the arithmetic precision differs.
    assert (single - double).abs().max() < 1e-5 * double.abs().max()


def test_grid_levels_and_any_grid_size():
    assert [grid_levels((n, n)) for n in (4, 7, 8, 16, 64, 85, 129)] == [1, 2, 2, 3, 5, 5, 6]
    model = MgNO(1, 1, grid=(64, 64), width=4, n_layers=1)
    for shape in [(64, 64), (65, 63), (100, 37)]:  # other sizes run with the same levels
        assert model(torch.randn(1, 1, *shape)).shape == (1, 1, *shape)
    with pytest.raises(ValueError, match="too small for 5 levels"):
        model(torch.randn(1, 1, 12, 40))


def test_mgconv_is_a_linear_operator():
    torch.manual_seed(0)
    cycle = MgConv(4, levels=3).double()
    f, g = torch.randn(2, 2, 4, 21, 19, dtype=torch.float64)
    torch.testing.assert_close(cycle(2.0 * f - 3.0 * g), 2.0 * cycle(f) - 3.0 * cycle(g))


def test_fe_multigrid_on_a_hierarchy():
    torch.manual_seed(0)
    spaces = hierarchy(l_shape(3), 3, dirichlet="boundary")
    assert [s.n_dofs for s in spaces] == [8, 21, 65]
    model = FEMultigrid(spaces, 2, 1, width=6, n_layers=2)
    x = torch.randn(3, 2, 65)
    assert model(x).shape == (3, 1, 65)
    _all_parameters_get_gradients(model, x)
    small = FEMultigrid(hierarchy(unit_square(3), 2), 1, 1, width=3, n_layers=1).double()
    x = torch.randn(1, 1, small.space.n_dofs, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(small, (x,), fast_mode=True)
    cycle = FEMultigrid(spaces, 1, 1, width=4, n_layers=1).double()
    f, g = torch.randn(2, 65, 1, 4, dtype=torch.float64)  # node-major (n, B, C) inside
    torch.testing.assert_close(cycle._cycle(0, f + g), cycle._cycle(0, f) + cycle._cycle(0, g))


def test_fe_multigrid_on_a_hierarchy_that_is_not_nested():
    # 9 vertices a side do not refine 4: the prolongation is FE interpolation between
    # unrelated meshes, which still reproduces linear functions exactly (P1).
    torch.manual_seed(0)
    spaces = [FunctionSpace(unit_square(n), dirichlet="boundary") for n in (4, 9)]
    model = FEMultigrid([*spaces, FunctionSpace(spaces[-1].mesh.refined())], 1, 1, width=4)
    assert not model.nested and FEMultigrid(hierarchy(unit_square(4), 3), 1, 1).nested

    def linear(points):
        return 1.0 + 2.0 * points[:, 0] - 3.0 * points[:, 1]

    coarse = torch.from_numpy(linear(spaces[0].dof_points))[:, None, None]  # (n, B, C)
    torch.testing.assert_close(
        model.prolong[0].rows(coarse)[:, 0, 0],
        torch.from_numpy(linear(spaces[1].dof_points)),
        rtol=0,
        atol=1e-12,
    )
    x = torch.randn(2, 1, model.space.n_dofs)
    assert model(x).shape == (2, 1, model.space.n_dofs)
    _all_parameters_get_gradients(model, x)


def test_fe_multigrid_on_an_unstructured_mesh_from_a_file(tmp_path):
    spaces = hierarchy(load_mesh(write_unstructured_square(tmp_path / "m.msh", 40, 7, seed=0)), 3)
    model = FEMultigrid(spaces, 1, 1, width=4, n_layers=2)
    x = torch.randn(2, 1, spaces[-1].n_dofs)
    assert model(x).shape == (2, 1, spaces[-1].n_dofs)
    _all_parameters_get_gradients(model, x)


def test_stencil_operator_is_its_definition():
    # u Θ_0 + Σ_s (S_s u) Θ_s, written out tap by tap with dense stencils.
    space = hierarchy(l_shape(3), 2)[-1]
    stencils, n_stencils = _stencils(space)
    operator = _StencilOperator(5, n_stencils).double()
    u = torch.randn(space.n_dofs, 3, 5, dtype=torch.float64)  # (n, B, C)
    dense = stencils.rows(torch.eye(space.n_dofs, dtype=torch.float64))
    dense = dense.reshape(n_stencils, space.n_dofs, space.n_dofs)
    expected = u @ operator.weight[0]
    for s in range(n_stencils):
        expected = expected + torch.einsum("ij,jbc,cd->ibd", dense[s], u, operator.weight[s + 1])
    torch.testing.assert_close(operator(u, stencils), expected)


def test_processors_reject_bad_input():
    with pytest.raises(ValueError, match=r"\(batch, 3, 2 grid axes\)"):
        MgNO(3, 1, grid=(16, 16))(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        LSM(3, 1, depth=2)(torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="2 grid axes"):
        FNO(3, 1, n_modes=(4, 4))(torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="one domain, coarsest first: 12 DOF points of level 1"):
        FEMultigrid([*hierarchy(unit_square(3), 1), *hierarchy(l_shape(3), 2)[1:]], 1, 1)
    with pytest.raises(ValueError, match="padding"):
        MgNO(1, 1, grid=(8, 8), padding="reflect")
    with pytest.raises(ValueError, match=r"depth 5 needs at least 16 grid points per axis"):
        LSM(3, 1)(torch.zeros(1, 3, 13, 20))
    with pytest.raises(TypeError, match="FNO has no option 'width'; its options: n_modes"):
        FNO(3, 1, width=8)
