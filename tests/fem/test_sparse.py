"""SparseMatrix: products and gradients against dense matrices, precision and device moves."""

import pytest
import scipy.sparse
import torch

from fenop.fem import FunctionSpace, unit_square
from fenop.fem.sparse import SparseMatrix, apply
from tests.helpers import DEVICES


def _random_matrix(m=7, n=5, seed=0):
    return scipy.sparse.random_array((m, n), density=0.4, random_state=seed, format="csr")


def test_products_match_the_dense_matrix():
    a = _random_matrix()
    dense = torch.from_numpy(a.toarray())
    matrix = SparseMatrix(a)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(matrix(x), x @ dense.T, rtol=1e-14, atol=1e-14)
    rows = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(
        matrix.rows(rows), torch.einsum("mn,nbc->mbc", dense, rows), rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(matrix(x), apply(torch.from_numpy(a.toarray()).to_sparse_csr(), x))


def test_gradients_use_the_transpose():
    matrix = SparseMatrix(_random_matrix())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matrix, (x,))
    assert torch.autograd.gradgradcheck(matrix, (x,))
    rows = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matrix.rows, (rows,))


def test_the_transposed_product_and_forward_mode():
    a = _random_matrix()
    dense = torch.from_numpy(a.toarray())
    matrix = SparseMatrix(a)
    y = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(matrix.transposed(y), y @ dense, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(matrix.transposed, (y,))
    x, v = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    # forward mode through both of torch's interfaces (the product is linear: J v = A v)
    _, tangent = torch.func.jvp(matrix, (x,), (v,))
    torch.testing.assert_close(tangent, v @ dense.T, rtol=1e-14, atol=1e-14)
    with torch.autograd.forward_ad.dual_level():
        out = matrix(torch.autograd.forward_ad.make_dual(x, v))
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, v @ dense.T, rtol=1e-14, atol=1e-14)


def test_precision_follows_the_input_and_the_float64_copy_survives_float():
    a = _random_matrix()
    module = torch.nn.Sequential(torch.nn.Identity())
    module.matrix = SparseMatrix(a)
    module.float().double()  # must not round the float64 matrix through float32
    x = torch.randn(3, 5, dtype=torch.float64)
    expected = x @ torch.from_numpy(a.toarray()).T
    torch.testing.assert_close(module.matrix(x), expected, rtol=1e-15, atol=1e-15)
    out32 = module.matrix(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # FE products stay in float32
        assert module.matrix(x.bfloat16()).dtype == torch.float32
    assert module.state_dict() == {}  # built from the mesh: never in checkpoints


@pytest.mark.parametrize("device", DEVICES)
def test_moves_with_its_module_and_refuses_other_devices(device):
    space = FunctionSpace(unit_square(5))
    module = torch.nn.Module()
    module.mass = SparseMatrix(space.mass_matrix)
    module.to(device)
    assert module.mass.device.type == device
    u = torch.ones(space.n_dofs, dtype=torch.float64, device=device)
    assert abs(float(u @ module.mass(u)) - 1.0) < 1e-12  # ∫ 1 over the unit square
    if device == "cpu":
        return
    with pytest.raises(ValueError, match=r"move the module with \.to"):
        module.mass(u.cpu())


def test_a_device_move_moves_every_copy():
    # The meta device stands in for a GPU on machines without one.
    module = torch.nn.Module()
    module.matrix = SparseMatrix(_random_matrix())
    module.to("meta")
    assert module.matrix.device.type == "meta"
    assert all(m.device.type == "meta" for pair in module.matrix._copies.values() for m in pair)
    with pytest.raises(ValueError, match="input is on cpu but the FE matrix is on meta"):
        module.matrix(torch.zeros(5, dtype=torch.float64))


def test_each_rows_product_and_its_gradients():
    """``each``: one matrix-vector product a row, into a (B, m) result, against the
    product along the last dimension, with its gradients (also twice) and forward mode."""
    matrix = scipy.sparse.random(7, 5, density=0.5, random_state=0, format="csr")
    module = SparseMatrix(matrix)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = module.each(x)
    assert out.shape == (3, 7) and out.is_contiguous()
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(module.each(x.float()), out.float(), rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(module.each, (x,))
    assert torch.autograd.gradgradcheck(lambda v: module.each(v).square(), (x,))
    tangent = torch.randn_like(x)
    _, derivative = torch.func.jvp(module.each, (x.detach(),), (tangent,))
    torch.testing.assert_close(derivative, module(tangent))
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        module.each(x[:, :4])
