import numpy as np
import pytest
import torch

from fenop.fem import FunctionSpace, hierarchy, l_shape, unit_square
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO
from tests.helpers import DEVICES

SPACE = FunctionSpace(l_shape(9), dirichlet="boundary")


def _models(space: FunctionSpace):
    spaces = hierarchy(l_shape(5), 2, dirichlet="boundary")
    coarser = hierarchy(l_shape(3), 2)  # finest level: 21 DOFs, against `space`'s 65
    return {
        "fno": FEOperator(
            space, space, FNO(4, 1, n_modes=(6, 6), hidden_channels=8), resolution=16
        ),
        "mgno": FEOperator(
            space, space, MgNO(4, 1, grid=(16, 16), width=6, n_layers=2), resolution=16
        ),
        "lsm": FEOperator(space, space, LSM(4, 1, width=8, depth=3), resolution=16),
        "femultigrid": FEOperator(
            spaces[-1], spaces[-1], FEMultigrid(spaces, 1, 1, width=6, n_layers=2)
        ),
        # on another mesh than its own: input and output interpolated
        "femultigrid-interpolated": FEOperator(
            space, space, FEMultigrid(coarser, 1, 1, width=6, n_layers=2)
        ),
    }


NAMES = ["fno", "mgno", "lsm", "femultigrid", "femultigrid-interpolated"]


@pytest.mark.parametrize("name", NAMES)
def test_dirichlet_values_are_exact_for_every_processor(name):
    torch.manual_seed(0)
    model = _models(SPACE)[name]
    space = model.space_out
    x = 100 * torch.randn(3, 1, space.n_dofs)
    u = model(x)
    assert u.shape == (3, 1, space.n_dofs)
    assert torch.max(torch.abs(u[..., space.boundary_dofs])).item() == 0.0
    g = torch.randn(3, 1, len(space.boundary_dofs))
    assert torch.equal(model(x, boundary_values=g)[..., space.boundary_dofs], g)
    u.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_normalisation(name):
    torch.manual_seed(0)
    model = _models(SPACE)[name]
    space = model.space_out
    stats = FEOperator(
        model.space_in,
        space,
        model.processor,
        resolution=model.resolution,
        input_stats=([2.0], [3.0]),
        output_stats=([0.0], [0.5]),
    )
    x = torch.randn(2, 1, space.n_dofs)
    # Normalisation is an affine map around the very same network.
    expected = model((x - 2.0) / 3.0) * 0.5
    torch.testing.assert_close(stats(x), expected, rtol=1e-5, atol=1e-6)
    double = stats.double()
    assert double(x.double()).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_moves_to_device(device):
    model = _models(SPACE)["mgno"].to(device)
    u = model(torch.randn(2, 1, SPACE.n_dofs, device=device))
    assert u.device.type == device
    assert {p.device.type for p in model.parameters()} == {device}


def test_transfer_to_another_mesh_of_the_domain():
    torch.manual_seed(0)
    model = _models(SPACE)["fno"]
    finer = FunctionSpace(l_shape(17), dirichlet="boundary")
    moved = model.transfer(finer)
    assert moved.processor is model.processor
    assert moved(torch.randn(2, 1, finer.n_dofs)).shape == (2, 1, finer.n_dofs)
    with pytest.raises(ValueError, match=r"model's domain spans \[-1.0, -1.0\] to \[1.0, 1.0\]"):
        model.transfer(FunctionSpace(unit_square(9), dirichlet="boundary"))


def test_femultigrid_transfers_by_interpolation_through_its_own_mesh():
    torch.manual_seed(0)
    model = _models(SPACE)["femultigrid"]
    own = model.processor.space
    finer = FunctionSpace(l_shape(17), degree=2, dirichlet="boundary")
    moved = model.transfer(finer)
    assert moved.processor is model.processor
    x = torch.randn(2, 1, finer.n_dofs, dtype=torch.float64)
    # The definition, written with point evaluation: the input's values at the
    # processor's nodes, the output's values at the new DOF points, zero on the boundary.
    model.double()
    expected = own.evaluate(model.processor(finer.evaluate(x, own.dof_points)), finer.dof_points)
    expected[..., finer.boundary_dofs] = 0.0
    torch.testing.assert_close(moved(x), expected, rtol=1e-12, atol=1e-12)
    # The square (-1, 1)^2 has the L-shape's bounding box, but not its domain.
    square = FunctionSpace(unit_square(9).scaled([2.0, 2.0]).translated([-1.0, -1.0]))
    with pytest.raises(ValueError, match="16 of 81 DOF points of the target mesh lie outside"):
        model.transfer(square)


def test_bad_construction_and_input():
    fno = FNO(4, 1, n_modes=(4, 4), hidden_channels=4)
    with pytest.raises(ValueError, match="`resolution` is required"):
        FEOperator(SPACE, SPACE, fno)
    with pytest.raises(ValueError, match="encoder alone adds 3"):
        FEOperator(SPACE, SPACE, FNO(2, 1, n_modes=(4, 4)), resolution=8)
    with pytest.raises(TypeError, match="in_channels"):
        FEOperator(SPACE, SPACE, torch.nn.Identity(), resolution=8)
    # FEMultigrid on another domain: the L-shape's nodes are not all in the unit square.
    with pytest.raises(ValueError, match="40 of 65 DOF points of the target mesh lie outside"):
        FEOperator(SPACE, SPACE, FEMultigrid(hierarchy(unit_square(3), 3), 1, 1))
    model = FEOperator(SPACE, SPACE, fno, resolution=8)
    with pytest.raises(ValueError, match=r"\(batch, 1, 65\), got \(2, 2, 65\)"):
        model(torch.zeros(2, 2, SPACE.n_dofs))
    # float64 data (NumPy's default) into a float32 model: said so, not a bias mismatch
    with pytest.raises(ValueError, match=r"input is torch.float64 but the model is torch.float32"):
        model(torch.zeros(2, 1, SPACE.n_dofs, dtype=torch.float64))
    assert np.array_equal(model.decoder.boundary_dofs.numpy(), SPACE.boundary_dofs)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_runs_only_the_processor_in_bfloat16(name):
    torch.manual_seed(0)
    model = _models(SPACE)[name]
    space = model.space_out
    x = torch.randn(2, 1, space.n_dofs)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = model(x)
    assert u.dtype == torch.float32
    assert torch.max(torch.abs(u[..., space.boundary_dofs])).item() == 0.0
    # bfloat16 keeps 8 significant bits: about 0.4% per operation.
    assert (torch.linalg.norm(u - reference) / torch.linalg.norm(reference)).item() < 0.05
    u.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_every_processor_on_cuda_computes_what_it_computes_on_the_cpu(name, dtype):
    torch.manual_seed(0)
    model = _models(SPACE)[name].to(dtype)
    space = model.space_out
    x = torch.randn(3, 1, space.n_dofs, dtype=dtype)
    expected = model(x)
    expected.square().mean().backward()
    cpu_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    model.cuda()
    x = x.cuda()
    # Any host synchronisation in forward (.item(), .cpu(), data-dependent shapes)
    # raises here: nothing may leave the GPU inside the model.
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    u.square().mean().backward()
    assert u.device.type == "cuda" and u.dtype == dtype
    assert torch.max(torch.abs(u[..., space.boundary_dofs])).item() == 0.0
    # cuDNN may use TF32 for float32 convolutions: 10 mantissa bits.
    rtol = 1e-9 if dtype == torch.float64 else 2e-2
    relative = torch.linalg.norm(u.cpu() - expected) / torch.linalg.norm(expected)
    assert relative.item() < rtol
    for p, g in zip(model.parameters(), cpu_grads, strict=True):
        assert p.grad is not None and p.grad.device.type == "cuda"
        scale = torch.linalg.norm(g).item() + 1e-30
        assert torch.linalg.norm(p.grad.cpu() - g).item() / scale < 10 * rtol


def test_to_a_dtype_keeps_complex_spectral_weights_complex():
    # torch's Module.to(float32) would cast the FNO's complex weights to real.
    torch.manual_seed(0)
    model = _models(SPACE)["fno"]
    x = torch.randn(2, 1, SPACE.n_dofs)
    expected = model(x)
    model.to(torch.float64)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float64, torch.complex128}
    torch.testing.assert_close(model(x.double()).float(), expected, rtol=1e-5, atol=1e-6)
    model.to(torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.complex64}
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7)
