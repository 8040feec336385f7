import numpy as np
import pytest
import torch

from fenop.fem import FunctionSpace, SpaceInterpolator, l_shape, unit_interval, unit_square
from tests.helpers import DEVICES, unstructured_square_mesh


def _unstructured(seed: int = 0):
    return unstructured_square_mesh(60, 9, seed=seed)


@pytest.mark.parametrize(
    ("source", "target", "f"),
    [
        # linear functions: P1 holds them on any mesh, so any target gets them exactly
        (FunctionSpace(unit_square(5)), FunctionSpace(_unstructured()), lambda x: 1 + 2 * x[0]),
        (FunctionSpace(_unstructured()), FunctionSpace(unit_square(7), degree=2), lambda x: x[1]),
        # a quadratic: P2 to P2 between unrelated meshes
        (
            FunctionSpace(_unstructured(1), degree=2),
            FunctionSpace(_unstructured(2), degree=2),
            lambda x: x[0] * x[1] - x[1] ** 2,
        ),
        (FunctionSpace(l_shape(5)), FunctionSpace(l_shape(9)), lambda x: x[0] - 3 * x[1]),
    ],
)
def test_functions_both_spaces_hold_arrive_exactly(source, target, f):
    u = source.interpolate(f)
    moved = SpaceInterpolator(source, target)(u[None, None])
    assert moved.shape == (1, 1, target.n_dofs)
    np.testing.assert_allclose(moved[0, 0].numpy(), f(target.dof_points.T), atol=1e-12)


def test_meshes_with_the_same_nodes_give_a_permutation():
    structured = FunctionSpace(unit_square(9))
    refined = FunctionSpace(unit_square(3).refined(2))  # the same 81 nodes, numbered otherwise
    # which structured node each refined node is, found from the coordinates alone
    distance = np.linalg.norm(refined.dof_points[:, None] - structured.dof_points[None], axis=-1)
    order = distance.argmin(axis=1)
    assert len(set(order)) == 81
    u = torch.randn(2, 3, 81, dtype=torch.float64)
    assert torch.equal(SpaceInterpolator(structured, refined)(u), u[..., order])


def test_gradient():
    interpolator = SpaceInterpolator(FunctionSpace(l_shape(5)), FunctionSpace(l_shape(7)))
    x = torch.randn(2, 1, 21, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(interpolator, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_moves_to_device(device):
    source, target = FunctionSpace(unit_square(5)), FunctionSpace(unit_square(4))
    interpolator = SpaceInterpolator(source, target).to(device)
    u = torch.randn(2, source.n_dofs, device=device)
    expected = SpaceInterpolator(source, target)(u.cpu())
    out = interpolator(u)
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), expected)


def test_bad_input():
    square = FunctionSpace(unit_square(5))
    with pytest.raises(ValueError, match=r"40 of 65 DOF points of the target mesh lie outside"):
        SpaceInterpolator(square, FunctionSpace(l_shape(9)))
    with pytest.raises(ValueError, match="1-D"):
        SpaceInterpolator(square, FunctionSpace(unit_interval(5)))
    with pytest.raises(TypeError, match="`target` must be a FunctionSpace, got MeshTri1"):
        SpaceInterpolator(square, unit_square(5))
    interpolator = SpaceInterpolator(square, FunctionSpace(unit_square(3)))
    with pytest.raises(ValueError, match=r"25 DOFs in its last dimension.*got shape \(2, 24\)"):
        interpolator(torch.zeros(2, 24))


def test_a_mesh_of_the_curve_beyond_a_refined_meshs_chords_is_reached_by_extrapolation():
    # A coarse disk refined twice cuts the circle by chords; a disk meshed as finely
    # has its boundary points on the circle, outside the refined mesh by a fraction
    # of a cell. Those take the extrapolated value: exact for a linear function.
    import skfem

    chords = FunctionSpace(skfem.MeshTri.init_circle(2).refined(2))
    curve = FunctionSpace(skfem.MeshTri.init_circle(4))
    with pytest.raises(ValueError, match=r"48 of 545 DOF points .* by more than 0 of a cell"):
        SpaceInterpolator(chords, curve, padding=0.0)
    interpolator = SpaceInterpolator(chords, curve)  # padding: half a cell
    u = chords.interpolate(lambda x: 1 + 2 * x[0] - x[1])
    exact = curve.interpolate(lambda x: 1 + 2 * x[0] - x[1])
    torch.testing.assert_close(interpolator(u), exact, rtol=0, atol=1e-12)
    # a disk a fifth larger is not the same domain, padding or not
    wider = skfem.MeshTri.init_circle(4)
    wider = FunctionSpace(skfem.MeshTri(wider.p * 1.2, wider.t))
    with pytest.raises(ValueError, match=r"by more than 0.5 of a cell"):
        SpaceInterpolator(chords, wider)


def test_femultigrid_runs_on_a_curved_domain_whose_data_mesh_is_not_its_hierarchy():
    import skfem

    from fenop.fem import hierarchy
    from fenop.operators import FEMultigrid, FEOperator

    data = FunctionSpace(skfem.MeshTri.init_circle(4), dirichlet="boundary")
    levels = hierarchy(skfem.MeshTri.init_circle(2), 3)  # 41 -> 145 -> 545 vertices, chords
    model = FEOperator(data, data, FEMultigrid(levels, 1, 1, width=4, n_layers=1))
    out = model(torch.randn(2, 1, data.n_dofs))
    assert out.shape == (2, 1, data.n_dofs) and torch.isfinite(out).all()
    assert out[..., data.boundary_dofs].abs().max() == 0  # Dirichlet values exact
