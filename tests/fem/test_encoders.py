import numpy as np
import pytest
import torch

from fenop.fem import FunctionSpace, GridEncoder, l_shape, unit_cube, unit_square
from tests.helpers import DEVICES


def test_l_shape_encoding_values_mask_and_coordinates():
    space = FunctionSpace(l_shape(9), degree=2)
    encoder = GridEncoder(space, (17, 13))
    f = lambda x: 1 + x[0] - 2 * x[1] ** 2  # noqa: E731  (in the P2 space: exact at grid points)
    u = space.interpolate(f)[None, None]
    out = encoder(u)
    assert out.shape == (1, 4, 17, 13)
    points = encoder.grid.points().reshape(17, 13, 2)
    x, y = points[..., 0], points[..., 1]
    outside = (x > 1e-12) & (y < -1e-12)  # the removed quadrant, its boundary excluded
    np.testing.assert_array_equal(out[0, 1].numpy(), (~outside).astype(float))
    np.testing.assert_allclose(out[0, 0].numpy()[~outside], f((x, y))[~outside], atol=1e-12)
    # outside, the value of the nearest boundary DOF: for (1, -1/6) that is (1, 0)
    assert out[0, 0, -1, 5].item() == pytest.approx(f((1.0, 0.0)), abs=1e-12)
    zero_outside = GridEncoder(space, (17, 13), extend=False)(u)
    assert (zero_outside[0, 0].numpy()[outside] == 0).all()
    np.testing.assert_allclose(out[0, 2].numpy(), (x + 1) / 2, atol=1e-15)
    np.testing.assert_allclose(out[0, 3].numpy(), (y + 1) / 2, atol=1e-15)


def test_channels_can_be_left_out_and_3d_works():
    space = FunctionSpace(unit_cube(3))
    encoder = GridEncoder(space, 5, mask=False, coordinates=False)
    assert encoder.out_channels(2) == 2
    assert encoder(torch.zeros(1, 2, space.n_dofs)).shape == (1, 2, 5, 5, 5)


def test_encoder_gradient():
    space = FunctionSpace(l_shape(5))
    encoder = GridEncoder(space, 6)
    x = torch.randn(2, 1, space.n_dofs, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(encoder, (x,))


def test_encoder_rejects_wrong_shapes_and_spaces():
    encoder = GridEncoder(FunctionSpace(unit_square(5)), 8)
    with pytest.raises(ValueError, match=r"\(batch, channels, n_dofs\), got \(25,\)"):
        encoder(torch.zeros(25))
    other = FunctionSpace(unit_square(6))
    with pytest.raises(ValueError, match=r"25 DOFs.*got shape \(1, 1, 36\)"):
        encoder(torch.zeros(1, 1, other.n_dofs))
    with pytest.raises(TypeError, match="FunctionSpace"):
        GridEncoder(unit_square(5), 8)
    with pytest.raises(ValueError, match="2 ints for a 2-D mesh"):
        GridEncoder(other, (8, 8, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_moves_with_to(device):
    space = FunctionSpace(unit_square(5))
    encoder = GridEncoder(space, 8).to(device=device, dtype=torch.float32)
    assert encoder.matrix.device.type == device
    x = space.interpolate(lambda x: x[0])[None, None].float().to(device)
    out = encoder(x)
    assert out.device.type == device and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], out[0, 2])  # the value x equals the x-coordinate
    assert encoder.state_dict() == {}  # derived from the mesh, never stored in checkpoints
