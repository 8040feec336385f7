"""JacobianPattern: residual Jacobians recovered by colouring, against autograd's dense
Jacobian; products and their gradients; diagonal blocks of subdomains."""

import numpy as np
import pytest
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, l_shape, unit_square
from fenop.fem.jacobian import JacobianPattern
from fenop.fem.partition import dof_graph
from fenop.train.physics import residual_inputs

SPACES = {
    "P1 L-shape": lambda: FunctionSpace(l_shape(7), dirichlet="boundary"),
    "P2 square": lambda: FunctionSpace(unit_square(5), degree=2, dirichlet="boundary"),
    "Q1 square": lambda: FunctionSpace(unit_square(6, cell="quad"), dirichlet="boundary"),
}


@pytest.mark.parametrize("name", SPACES)
def test_columns_of_one_colour_share_no_row(name):
    space = SPACES[name]()
    pattern = JacobianPattern(space)
    graph = dof_graph(space).toarray() > 0
    seeds = pattern.seeds.numpy() > 0
    assert (seeds.sum(axis=0) == 1).all()  # every column has one colour
    # rows touched by each colour's columns: at most one column per row
    assert (graph.astype(int) @ seeds.T.astype(int)).max() == 1
    assert pattern.n_colours < space.n_dofs / 2


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("pde", ["darcy", "nonlinear_diffusion"])
def test_recovered_jacobian_is_autograds(name, pde):
    space = SPACES[name]()
    family = get_pde(pde)(space)
    residual = family.residual()
    (field,) = family.inputs
    sample = family.sample(0, 0)
    inputs = {field: torch.from_numpy(sample[field])}
    u = torch.from_numpy(sample["u"]) * 0.7 + 0.1  # not the solution: J depends on u
    pattern = JacobianPattern(space)
    dense = torch.autograd.functional.jacobian(lambda v: residual(v, **inputs), u)
    products = (dense @ pattern.seeds.T).T[None]  # what c linearisations give
    recovered = pattern.dense(pattern.values(products))[0]
    torch.testing.assert_close(recovered, dense, rtol=0, atol=1e-13 * dense.abs().max())


def test_products_and_their_gradients():
    space = FunctionSpace(unit_square(5))
    pattern = JacobianPattern(space)
    values = torch.randn(2, pattern.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, space.n_dofs, dtype=torch.float64, requires_grad=True)
    dense = pattern.dense(values)
    torch.testing.assert_close(pattern.matmul(values, x), x @ dense.transpose(1, 2))
    assert torch.autograd.gradcheck(pattern.matmul, (values, x))
    # one field: matrix-vector products, and the gradient's outer product by gathers
    one = x[:, :1].detach().clone().requires_grad_(True)
    torch.testing.assert_close(pattern.matmul(values, one), one @ dense.transpose(1, 2))
    assert torch.autograd.gradcheck(pattern.matmul, (values, one))
    transposed = pattern.matmul(values, x, transpose=True)
    torch.testing.assert_close(transposed, x @ dense)
    left, right = x[:, 0].detach(), x[:, 1].detach()
    outer = pattern.dense(pattern.outer(left, right))
    on_pattern = pattern.dense(torch.ones_like(values)) != 0
    expected = torch.where(on_pattern, left[:, :, None] * right[:, None, :], 0.0)
    torch.testing.assert_close(outer, expected)


def test_products_of_batches_that_shrink_and_grow():
    """The block-diagonal indices are made for the largest batch seen and sliced for
    smaller ones: every size, in any order, multiplies by its own matrices."""
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    pattern = JacobianPattern(space)
    for batch in (3, 1, 5, 2):
        values = torch.randn(batch, pattern.nnz, dtype=torch.float64, requires_grad=True)
        x = torch.randn(batch, 2, space.n_dofs, dtype=torch.float64, requires_grad=True)
        dense = pattern.dense(values)
        torch.testing.assert_close(pattern.matmul(values, x), x @ dense.transpose(1, 2))
        grads = torch.autograd.grad(pattern.matmul(values, x).square().sum(), (values, x))
        expected = torch.autograd.grad((x @ dense.transpose(1, 2)).square().sum(), (values, x))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_the_kept_transposes_follow_their_matrices():
    """The backward pass keeps the last matrices' transposed entries: products with
    two matrices in one graph, a matrix changed in place between two backward passes
    and a matrix freed and another made (perhaps in its memory) each get their own
    transpose."""
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    pattern = JacobianPattern(space)
    x = torch.randn(2, 1, space.n_dofs, dtype=torch.float64, requires_grad=True)

    def gradient(first, second):
        """The gradient in ``x`` of ``|J2 J1 x + J1 x|²``, and dense autograd's."""
        y = pattern.matmul(first, x)
        got = torch.autograd.grad((pattern.matmul(second, y) + y).square().sum(), x)[0]
        d1, d2 = pattern.dense(first), pattern.dense(second)
        y = x @ d1.transpose(1, 2)
        want = torch.autograd.grad((y @ d2.transpose(1, 2) + y).square().sum(), x)[0]
        return got, want

    for _ in range(3):  # each new pair may take the memory of the last
        first, second = (torch.randn(2, pattern.nnz, dtype=torch.float64) for _ in range(2))
        torch.testing.assert_close(*gradient(first, second))  # keeps first's
        first.mul_(-2.0)  # in place: a new version of the same memory
        torch.testing.assert_close(*gradient(first, first))
        torch.testing.assert_close(*gradient(second, first))
        del first, second


@pytest.mark.parametrize("wanted", ["all", "u only", "values only"])
def test_jacobi_sweeps_are_dense_sweeps_with_their_gradients(wanted):
    """The fused sweeps against dense ``u - s (A u + c)`` with autograd's gradient,
    in every input or only some (the saved fields differ), and gradcheck."""
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    pattern = JacobianPattern(space)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, pattern.nnz, dtype=torch.float64, generator=generator)
    offset, u = torch.randn(2, 2, space.n_dofs, dtype=torch.float64, generator=generator)
    step = torch.rand(2, space.n_dofs, dtype=torch.float64, generator=generator) / 4
    grads = {
        "all": (True,) * 4,
        "u only": (False,) * 3 + (True,),
        "values only": (True,) + (False,) * 3,
    }
    inputs = [
        x.clone().requires_grad_(g)
        for x, g in zip((values, offset, step, u), grads[wanted], strict=True)
    ]

    def dense(values, offset, step, u):
        matrix = pattern.dense(values)
        for _ in range(3):
            u = u - step * ((matrix @ u[..., None])[..., 0] + offset)
        return u

    got = pattern.jacobi(*inputs, sweeps=3)
    torch.testing.assert_close(got, dense(*inputs))
    needed = [x for x in inputs if x.requires_grad]
    weights = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    mine = torch.autograd.grad((got * weights).sum(), needed)
    autograds = torch.autograd.grad((dense(*inputs) * weights).sum(), needed)
    for a, b in zip(mine, autograds, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *x: pattern.jacobi(*x, sweeps=2), tuple(inputs))
    assert pattern.jacobi(*inputs, sweeps=0) is inputs[3]


def test_blocks_are_the_subdomains_submatrices():
    space = FunctionSpace(unit_square(7))
    pattern = JacobianPattern(space)
    partition = MetisPartition(experts=3).partition(space, overlap=1)
    cols = [np.flatnonzero(e) for e in partition.extended]
    rows = [np.flatnonzero(e | h) for e, h in zip(partition.extended, partition.halo, strict=True)]
    blocks = pattern.blocks(rows, cols)
    values = torch.randn(2, pattern.nnz, dtype=torch.float64, requires_grad=True)
    width = max(map(len, cols))
    x = torch.zeros(2, 3, 4, width, dtype=torch.float64)
    for k, c in enumerate(cols):
        x[:, k, :, : len(c)] = torch.randn(2, 4, len(c), dtype=torch.float64)
    out = blocks.matmul(values, x)
    dense = pattern.dense(values)
    for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
        expected = x[:, k, :, : len(c)] @ dense[:, r][:, :, c].transpose(1, 2)
        torch.testing.assert_close(out[:, k, :, : len(r)], expected)
        assert (out[:, k, :, len(r) :] == 0).all()  # padding rows have no entries
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(blocks.matmul, (values, x))


def test_shapes_are_checked():
    space = FunctionSpace(unit_square(4))
    pattern = JacobianPattern(space)
    with pytest.raises(ValueError, match="products"):
        pattern.values(torch.zeros(1, pattern.n_colours + 1, space.n_dofs))
    with pytest.raises(ValueError, match="values"):
        pattern.matmul(torch.zeros(1, 3), torch.zeros(1, 1, space.n_dofs))
    fields = torch.zeros(1, space.n_dofs)
    with pytest.raises(ValueError, match="step"):
        pattern.jacobi(torch.zeros(1, pattern.nnz), fields, fields[:, 1:], fields, sweeps=1)


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("pde", ["darcy", "poisson", "heat"])
def test_affine_residuals_assemble_the_jacobian_the_colouring_recovers(name, pde):
    space = SPACES[name]()
    family = get_pde(pde)(space)
    residual = family.residual()
    sample = family.sample(0, 0)
    inputs = {k: torch.from_numpy(sample[k])[None] for k in residual_inputs(residual)}
    pattern = JacobianPattern(space)
    zero = torch.zeros(1, space.n_dofs, dtype=torch.float64)
    fields = torch.cat([zero[:, None], pattern.seeds[None]], dim=1)
    out = residual(fields, **{k: v[:, None] for k, v in inputs.items()})
    recovered = pattern.values(out[:, 1:] - out[:, :1])
    assembled = residual.jacobian_entries(pattern, **inputs)
    torch.testing.assert_close(assembled, recovered, rtol=0, atol=1e-12 * recovered.abs().max())
    offset = residual.offset(**inputs)  # R(0), where the residual has it without evaluating
    if offset is not None:
        torch.testing.assert_close(offset, out[:, 0], rtol=0, atol=1e-14)


def _nonlinear_case(pde: str, space: FunctionSpace):
    """A nonlinear family's residual, a field that is not its solution, the inputs,
    and scikit-fem's assembly of the data generator's Newton matrix at a field."""
    family = get_pde(pde)(space, **({"n_steps": 4, "t_final": 1.0} if pde == "allen_cahn" else {}))
    sample = family.sample(0, 0)
    if pde == "allen_cahn":
        from fenop.data.pdes.allen_cahn import _jacobian

        states = torch.from_numpy(sample["u"])
        u, inputs = 1.3 * states[2][None], {"u_prev": states[1][None]}
        options = {"dt": family.dt, "eps2": family.epsilon**2}
    else:
        from fenop.data.pdes.nonlinear_diffusion import _jacobian

        u, inputs = (
            0.7 * torch.from_numpy(sample["u"])[None],
            {"f": torch.from_numpy(sample["f"])[None]},
        )
        options = {}

    def reference(u: np.ndarray) -> np.ndarray:
        return _jacobian.assemble(space.basis, u=space.basis.interpolate(u), **options).toarray()

    return family.residual(), u, inputs, reference


@pytest.mark.parametrize("pde", ["nonlinear_diffusion", "allen_cahn"])
@pytest.mark.parametrize("name", SPACES)
def test_nonlinear_residuals_assemble_scikit_fems_jacobian(name, pde):
    # linearised against the data generator's Newton matrix, assembled by
    # scikit-fem (identity rows at the Dirichlet DOFs)
    space = SPACES[name]()
    residual, u, inputs, reference_at = _nonlinear_case(pde, space)
    pattern = JacobianPattern(space)
    r, entries = residual.linearised(pattern, u, **inputs)
    torch.testing.assert_close(r, residual(u, **inputs), rtol=0, atol=1e-12 * r.abs().max())
    reference = reference_at(u[0].numpy())
    dirichlet = space.boundary_dofs
    reference[dirichlet] = 0.0
    reference[dirichlet, dirichlet] = 1.0
    dense = pattern.dense(entries)[0].numpy()
    np.testing.assert_allclose(dense, reference, rtol=0, atol=1e-12 * np.abs(reference).max())


@pytest.mark.parametrize("pde", ["darcy", "poisson", "heat", "nonlinear_diffusion", "allen_cahn"])
def test_residuals_declared_symmetric_have_positive_definite_jacobians(pde):
    # what `symmetric` promises the layers (Cholesky for their Galerkin systems):
    # J symmetric and positive definite on the free DOFs, at a field that is not
    # the solution; checked by NumPy's eigenvalues of autograd's dense Jacobian
    space = SPACES["P1 L-shape"]()
    if pde in ("nonlinear_diffusion", "allen_cahn"):
        residual, u, inputs, _ = _nonlinear_case(pde, space)
    else:
        family = get_pde(pde)(space)
        residual = family.residual()
        sample = {k: torch.from_numpy(v) for k, v in family.sample(0, 0).items()}
        inputs = {  # a heat step's previous state: the trajectory's first
            n: (sample[n] if n in sample else sample["u"][0])[None]
            for n in residual_inputs(residual)
        }
        u = torch.randn(1, space.n_dofs, dtype=torch.float64)
    dense = torch.autograd.functional.jacobian(lambda v: residual(v[None], **inputs)[0], u[0])
    free = ~residual.dirichlet.numpy()
    block = dense.numpy()[free][:, free]
    symmetric = np.allclose(block, block.T, rtol=0, atol=1e-12 * np.abs(block).max())
    expected = {"darcy": True, "poisson": True, "heat": True, "allen_cahn": True}
    assert residual.symmetric == expected.get(pde, False)
    if residual.symmetric:
        assert symmetric and np.linalg.eigvalsh(block).min() > 0
    else:
        assert not symmetric


@pytest.mark.parametrize("pde", ["nonlinear_diffusion", "allen_cahn"])
def test_nonlinear_jacobians_on_subsets_of_cells_add_up_to_the_whole(pde):
    space = SPACES["P1 L-shape"]()
    residual, u, inputs, _ = _nonlinear_case(pde, space)
    pattern = JacobianPattern(space)
    whole = residual.linearised(pattern, u, **inputs)[1]
    cells = np.random.default_rng(0).permutation(space.mesh.t.shape[1])
    parts = []
    for subset in np.array_split(cells, 2):
        with residual.forms.on(residual.forms.subset(subset)):
            parts.append(residual.linearised(pattern, u, **inputs)[1])
    free = ~residual.dirichlet[pattern.entry_rows]  # Dirichlet rows are identity rows in each
    scale = whole[:, free].abs().max()
    torch.testing.assert_close(
        (parts[0] + parts[1])[:, free], whole[:, free], rtol=0, atol=1e-12 * scale
    )
    assert (parts[0][:, free] - whole[:, free]).abs().max() > 1e-3 * scale  # each part is a part
