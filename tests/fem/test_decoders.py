import numpy as np
import pytest
import torch

from fenop.fem import FEDecoder, FunctionSpace, GridEncoder, l2_norm, l_shape, unit_square
from tests.helpers import DEVICES, loglog_slope


@pytest.mark.parametrize(
    "boundary_values",
    [None, 2.5, lambda x: np.sin(3 * x[0]) + x[1] ** 2],
    ids=["zero", "constant", "callable"],
)
def test_boundary_values_are_exact_for_random_grid_input(boundary_values):
    space = FunctionSpace(l_shape(9), degree=2, dirichlet="boundary")
    decoder = FEDecoder(space, 20, boundary_values=boundary_values)
    u = decoder(1e3 * torch.randn(4, 3, 20, 20, dtype=torch.float64))
    g = decoder.boundary_values
    assert torch.max(torch.abs(u[..., space.boundary_dofs] - g)).item() == 0.0
    if callable(boundary_values):
        expected = boundary_values(space.dof_points[space.boundary_dofs].T)
        np.testing.assert_array_equal(g.numpy(), expected)


def test_per_sample_boundary_values_override():
    space = FunctionSpace(unit_square(6), dirichlet="boundary")
    decoder = FEDecoder(space, 8)
    g = torch.randn(3, 1, len(space.boundary_dofs))
    u = decoder(torch.randn(3, 1, 8, 8), boundary_values=g)
    assert torch.equal(u[..., space.boundary_dofs], g)


def test_decoder_reproduces_bilinear_grid_functions_at_the_dofs():
    space = FunctionSpace(l_shape(7), degree=2)
    decoder = FEDecoder(space, (9, 11))
    f = lambda x: (1 + x[0]) * (2 - 3 * x[1])  # noqa: E731
    grid_values = f(decoder.grid.points().T).reshape(1, 1, 9, 11)
    u = decoder(torch.from_numpy(grid_values))
    np.testing.assert_allclose(u[0, 0].numpy(), f(space.dof_points.T), atol=1e-12)


def test_encode_decode_round_trip_converges_with_the_grid():
    # Grids chosen so that their points are not the mesh's vertices.
    space = FunctionSpace(l_shape(65))
    u = space.interpolate(lambda x: np.sin(2 * x[0]) * np.cos(3 * x[1]) + 2)[None, None]
    errors = []
    for n in (14, 27, 53):
        back = FEDecoder(space, n)(GridEncoder(space, n, mask=False, coordinates=False)(u))
        errors.append(torch.max(torch.abs(back - u)).item())
    # For a fixed mesh the error is first order in the grid spacing: the grid interpolates
    # a piecewise-linear function across its kinks. On the 14-point grid, which misses
    # the re-entrant edges, stencils also reach the extension outside the domain.
    assert errors[0] > 1.6 * errors[1] > 1.6**2 * errors[2]
    assert errors[2] < 0.05


@pytest.mark.parametrize("ratio", [0.77, 1.37])
def test_encode_decode_round_trip_is_second_order_as_mesh_and_grid_refine(ratio):
    # Mesh and grid refined together (grid points not at the vertices): the round trip
    # is multilinear interpolation of the P1 interpolant, second order in h.
    def f(x):
        return np.sin(2 * x[0]) * np.cos(3 * x[1]) + 2

    sides = (17, 33, 65)
    errors = []
    for n in sides:
        space = FunctionSpace(unit_square(n))
        u = space.interpolate(f)[None, None]
        grid = round(ratio * (n - 1)) + 1
        back = FEDecoder(space, grid)(GridEncoder(space, grid, mask=False, coordinates=False)(u))
        errors.append((l2_norm(back - u, space) / l2_norm(u, space)).item())
    assert abs(loglog_slope([1 / (n - 1) for n in sides], errors) - 2.0) <= 0.1


def test_decoder_gradient():
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    decoder = FEDecoder(space, 6, boundary_values=1.0)
    y = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decoder, (y,))
    g = torch.randn(2, 1, len(space.boundary_dofs), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, g: decoder(y, boundary_values=g), (y, g))


def test_decoder_rejects_bad_input():
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    decoder = FEDecoder(space, 8)
    with pytest.raises(ValueError, match=r"\(batch, channels, 8, 8\), got \(1, 1, 8, 9\)"):
        decoder(torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"shape \(16,\).*got \(3,\)"):
        FEDecoder(space, 8, boundary_values=np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        FEDecoder(space, 8, boundary_values=float("nan"))
    with pytest.raises(ValueError, match="no Dirichlet DOFs"):
        FEDecoder(FunctionSpace(unit_square(5)), 8, boundary_values=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_moves_with_to(device):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    decoder = FEDecoder(space, 8, boundary_values=1.0).to(device=device, dtype=torch.float32)
    u = decoder(torch.randn(2, 1, 8, 8, device=device))
    assert u.device.type == device and u.dtype == torch.float32
    assert bool((u[..., decoder.boundary_dofs] == 1.0).all())
    assert decoder.state_dict() == {}
