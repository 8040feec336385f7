"""Sparse Jacobians of FE residuals, recovered from a few linearisations by colouring.

An FE residual couples only DOFs that share a cell, so its Jacobian ``J`` has the
sparsity of the DOF graph. Columns that share no row (no DOF neighbours both) can
be probed together: ``J s_c``, with ``s_c`` the indicator of a group ``c`` of such
columns, holds each of their entries in its own row. A greedy colouring of the
columns (distance-2 in the DOF graph, :mod:`fenop.fem.colouring`; Curtis, Powell
& Reid 1974, the scheme behind PETSc's ``MatFDColoring``) gives ``c`` groups (9 on the P1 triangle
meshes of the unit square and the L-shape, 25 for P2), so ``c`` linearisations of
the residual recover all of ``J``, exactly, where a dense product with ``N`` fields
would take ``N`` of them. Products with the recovered matrix are sparse: their cost
is the DOFs', not the cells' times the quadrature points'.

:class:`JacobianPattern` holds the pattern, the colouring and batched products
``J X`` that are differentiable in both ``J``'s values and ``X`` (and damped Jacobi
sweeps made of them, :meth:`~JacobianPattern.jacobi`); its
:meth:`~JacobianPattern.blocks` are the diagonal blocks ``J[rows_k, cols_k]`` of
subdomains, so that each costs its own entries' work.

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9))
>>> pattern = JacobianPattern(space)
>>> stiffness = space.stiffness.to_dense()                # a residual's Jacobian
>>> values = pattern.values((stiffness @ pattern.seeds.T).T[None])  # c products -> entries
>>> x = torch.randn(1, 3, space.n_dofs, dtype=torch.float64)
>>> bool(torch.allclose(pattern.matmul(values, x), x @ stiffness.T))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.colouring import colour_graph
from fenop.fem.partition import _canonical_order, dof_graph
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import _quiet_csr, csr_product


def take_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for ``x`` ``(B, n)`` and ``index`` ``(m,)`` -> ``(B, m)``, by a
    gather: about 3x faster than advanced indexing on the CPU for the Jacobian's
    entries (batch 8, 1.2e5 entries: 0.7 against 2.1 ms), with a scatter-add backward."""
    return x.gather(1, index.expand(x.shape[0], -1))


class _CSRPattern(nn.Module):
    """A fixed ``(rows, cols)`` CSR pattern with its transpose, for batched products
    whose values change from call to call."""

    def __init__(self, matrix: scipy.sparse.csr_array):
        super().__init__()
        matrix = scipy.sparse.csr_array(matrix)
        matrix.sort_indices()
        self.shape, self.nnz = matrix.shape, matrix.nnz
        rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        transposed = scipy.sparse.csr_array(
            (np.arange(matrix.nnz, dtype=np.float64), (matrix.indices, rows)),
            shape=matrix.shape[::-1],
        )
        transposed.sort_indices()
        buffers = {
            "crow": matrix.indptr,
            "col": matrix.indices,
            "row": rows,  # each entry's row
            "crow_t": transposed.indptr,
            "col_t": transposed.indices,
            # entry s of the transpose is entry transpose_order[s] of the matrix
            "transpose_order": transposed.data,
        }
        for name, array in buffers.items():
            self.register_buffer(name, torch.from_numpy(array.astype(np.int64)), persistent=False)
        # the block-diagonal patterns' indices, for the largest batch seen (see `block`)
        self._blocks: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self._transposed: tuple | None = None  # the last reordering (see `reordered`)

    def rows(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``A_b x_b``: entries ``(B, nnz)``, ``x`` ``(B, cols, M)`` -> ``(B, rows, M)``."""
        return _PatternProduct.apply(values, x.to(values.dtype), self)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The entries ``(B, nnz)`` of ``left_b right_bᵀ`` on the pattern, from
        ``(B, rows)`` and ``(B, cols)``, by two gathers."""
        return take_columns(left, self.row) * take_columns(right, self.col)

    def reordered(self, values: torch.Tensor) -> torch.Tensor:
        """The entries ``(B, nnz)`` of the transposes of the matrices whose entries are
        ``values`` ``(B, nnz)``, in the transpose's order. Recorded where autograd
        wants it; otherwise the last ``values``' reordering is kept: it is a gather
        that took 3x the product with the transpose (6.6e4 DOFs, batch 8), and a
        constraint's backward pass multiplies by one ``J``'s transpose once per sweep
        and once in its solve. The key holds a reference to ``values``, so that their
        memory, and with it the key, cannot pass to another tensor; an in-place
        change of them changes their version, and the key."""
        if torch.is_grad_enabled() and values.requires_grad:
            return take_columns(values, self.transpose_order)
        key = (values.data_ptr(), values._version, values.shape, values.stride(), values.dtype)
        cached = self._transposed
        if cached is None or cached[0] != key or cached[1].device != values.device:
            entries = take_columns(values.detach(), self.transpose_order)
            cached = self._transposed = (key, values.detach(), entries)
        return cached[2]

    def block(self, values: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
        """The block-diagonal ``(B rows, B cols)`` CSR matrix of the B matrices whose
        entries are ``values`` ``(B, nnz)`` (``transposed``: of their transposes, the
        entries then in the transpose's order): one sparse product then serves the
        whole batch. Its indices are made once for the largest batch seen; a smaller
        batch's are their prefix, so that a product builds no index (which cost as
        much as the product itself). They are int32 where they fit: the sparse
        kernels (MKL, cuSPARSE) take int32, and convert int64 indices on every call
        (a third of an M = 1 product at 6.6e4 DOFs, batch 8)."""
        batch = values.shape[0]
        crow, col = (self.crow_t, self.col_t) if transposed else (self.crow, self.col)
        shape = self.shape[::-1] if transposed else self.shape
        cached = self._blocks.get(transposed)
        if cached is None or cached[0].device != values.device or len(cached[1]) < batch * self.nnz:
            offsets = torch.arange(batch, device=values.device)
            crow_b = torch.cat(
                [(crow[:-1] + offsets[:, None] * self.nnz).reshape(-1), crow[-1:] * batch]
            )
            col_b = (col + offsets[:, None] * shape[1]).reshape(-1)
            if batch * max(self.nnz, *shape) < 2**31:
                crow_b, col_b = crow_b.int(), col_b.int()
            cached = self._blocks[transposed] = (crow_b, col_b)
        crow_b, col_b = cached
        # block b starts at entry b nnz: the first B blocks' row pointers end with B nnz
        crow_b, col_b = crow_b[: batch * shape[0] + 1], col_b[: batch * self.nnz]
        size = (batch * shape[0], batch * shape[1])
        with _quiet_csr():
            return torch.sparse_csr_tensor(
                crow_b, col_b, values.reshape(-1), size=size, check_invariants=False
            )


class _PatternProduct(torch.autograd.Function):
    """``A x`` on a fixed pattern, ``x`` node-major ``(B, cols, M)``. Backward:
    ``Aᵀ G`` through the stored transposed pattern, and ``∂/∂A_ij = Σ_m G_im x_jm``
    sampled on the pattern (SDDMM), so that nothing of size (entries x M) is held.

    For one field (``M = 1``: a sweep, a residual) the products are matrix-vector
    products and the sampled gradient two gathers: the ``(n, 1)`` matrix's product
    copies its operand and result, and took 1.8x the time (the gradient by SDDMM
    1.4x; 6.6e4 DOFs, batch 8)."""

    @staticmethod
    def forward(values, x, pattern):
        batch, cols, fields = x.shape
        product = csr_product(pattern.block(values), x.reshape(batch * cols, fields).squeeze(1))
        return product.reshape(batch, -1, fields)

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, x, pattern = inputs
        ctx.pattern = pattern
        ctx.save_for_backward(values, x)

    @staticmethod
    def backward(ctx, grad):
        values, x = ctx.saved_tensors
        p = ctx.pattern
        batch, cols, fields = x.shape
        grad = grad.reshape(batch * p.shape[0], fields)
        grad_values = grad_x = None
        if ctx.needs_input_grad[1]:
            transposed = p.block(p.reordered(values), transposed=True)
            grad_x = csr_product(transposed, grad.squeeze(1)).reshape(batch, cols, fields)
        if ctx.needs_input_grad[0] and fields == 1:
            grad_values = p.outer(grad.reshape(batch, -1), x.reshape(batch, cols))
        elif ctx.needs_input_grad[0]:
            pattern = p.block(torch.zeros_like(values))
            flat = x.reshape(batch * cols, fields)
            sampled = torch.sparse.sampled_addmm(pattern, grad, flat.T, beta=0.0)
            grad_values = sampled.values().reshape(batch, -1)
        return grad_values, grad_x, None


class _JacobiSweeps(torch.autograd.Function):
    """``count`` sweeps ``u ← u - s ⊙ (A u + c)`` for entries ``values`` ``(B, nnz)``
    of ``A`` on a square pattern, ``c``, ``s`` and ``u`` ``(B, n)``. Each sweep is one
    sparse product that adds ``c`` in its kernel and one fused update, where
    autograd's sweep is a product, an addition, a multiplication and a subtraction,
    each a pass over ``(B, n)``, and as many again backward (measured: 31 against 22
    ms for 4 sweeps forward and backward, 6.6e4 DOFs, batch 8). The backward pass,
    from ``ḡ`` the gradient of ``u`` after a sweep: ``t = s ⊙ ḡ``, ``ḡ ← ḡ - Aᵀ t``
    before it, ``c̄ -= t``, ``s̄ -= ḡ ⊙ (A u + c)`` and ``Ā -= t uᵀ`` on the pattern;
    the sweeps' fields and residuals are kept only where ``s`` or ``A`` need their
    gradient. Once differentiable."""

    @staticmethod
    def forward(ctx, values, offset, step, u, pattern: _CSRPattern, count: int):
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        matrix = pattern.block(values)
        u = u.clone(memory_format=torch.contiguous_format)
        r = torch.empty_like(u)
        fields, residuals = [], []
        for _ in range(count):
            if keep:
                fields.append(u.clone())
            torch.addmv(offset.reshape(-1), matrix, u.reshape(-1), out=r.reshape(-1))
            if keep:
                residuals.append(r.clone())
            u.addcmul_(step, r, value=-1.0)
        ctx.pattern, ctx.count = pattern, count
        ctx.save_for_backward(values, step, *fields, *residuals)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        values, step, *kept = ctx.saved_tensors
        fields, residuals = kept[: len(kept) // 2], kept[len(kept) // 2 :]
        p, count = ctx.pattern, ctx.count
        transposed = p.block(p.reordered(values), transposed=True)
        grad = grad.clone(memory_format=torch.contiguous_format)
        t, spare = torch.empty_like(grad), torch.empty_like(grad)
        grad_offset = torch.zeros_like(grad) if ctx.needs_input_grad[1] else None
        grad_step = torch.zeros_like(grad) if ctx.needs_input_grad[2] else None
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[0] else None
        for k in reversed(range(count)):
            torch.mul(step, grad, out=t)
            if grad_offset is not None:
                grad_offset.sub_(t)
            if grad_step is not None:
                grad_step.addcmul_(grad, residuals[k], value=-1.0)
            if grad_values is not None:  # one pass: a product and a subtraction took 2x
                grad_values.addcmul_(
                    take_columns(t, p.row), take_columns(fields[k], p.col), value=-1.0
                )
            # into a second array: the kernel's output is not its input
            torch.addmv(
                grad.reshape(-1), transposed, t.reshape(-1), alpha=-1.0, out=spare.reshape(-1)
            )
            grad, spare = spare, grad
        return grad_values, grad_offset, grad_step, grad, None, None


class JacobianPattern(nn.Module):
    """The DOF-graph sparsity of a residual's Jacobian and a colouring of its columns.

    Args:
        space: the FE space of the residual.

    Attributes:
        n_colours: ``c``, the groups of columns probed together.
        seeds: ``(c, n_dofs)`` float64, the indicator of each group.
        nnz: entries of the pattern (row-major, columns sorted in each row).

    Shapes:
        :meth:`values`: products ``(B, c, n)`` -> entries ``(B, nnz)``;
        :meth:`matmul`: entries ``(B, nnz)``, fields ``(B, M, n)`` -> ``(B, M, n)``;
        :meth:`jacobi`: entries ``(B, nnz)``, offset, step and field ``(B, n)`` -> ``(B, n)``.
    """

    def __init__(self, space: FunctionSpace):
        super().__init__()
        graph = dof_graph(space)
        graph.sort_indices()
        # columns that share no row: a colouring of the graph's square
        square = scipy.sparse.csr_array(graph @ graph)
        colour = colour_graph(square, order=_canonical_order(space))
        n, c = space.n_dofs, int(colour.max()) + 1
        self.space, self.n_colours, self.nnz = space, c, graph.nnz
        self.pattern = _CSRPattern(graph)
        # where each entry sits in the pattern's value array, as a SciPy matrix
        self._positions = scipy.sparse.csr_array(
            (np.arange(1, graph.nnz + 1, dtype=np.float64), graph.indices, graph.indptr),
            shape=graph.shape,
        )
        diagonal = self._positions[np.arange(n), np.arange(n)]
        self.register_buffer(
            "diagonal",
            torch.from_numpy(np.asarray(diagonal).astype(np.int64) - 1),
            persistent=False,
        )
        seeds = np.zeros((c, n))
        seeds[colour, np.arange(n)] = 1.0
        self.register_buffer("seeds", torch.from_numpy(seeds), persistent=False)
        # entry (i, j) is row i of the product of j's colour: its place in (c, n)
        probe = colour[graph.indices] * n + self.pattern.row.numpy()
        self.register_buffer("probe", torch.from_numpy(probe), persistent=False)

    def values(self, products: torch.Tensor) -> torch.Tensor:
        """The entries ``(B, nnz)`` of ``J`` from its products with the seeds,
        ``products[:, c] = J seeds[c]`` ``(B, c, n)``."""
        if products.ndim != 3 or products.shape[1:] != self.seeds.shape:
            raise ValueError(
                f"`products` must have shape (batch, {self.n_colours}, {self.space.n_dofs}), "
                f"got {tuple(products.shape)}"
            )
        return take_columns(products.reshape(products.shape[0], -1), self.probe)

    def matmul(self, values: torch.Tensor, x: torch.Tensor, *, transpose=False) -> torch.Tensor:
        """``J_b X_b`` (``transpose``: ``J_bᵀ X_b``) for each batch element: entries
        ``(B, nnz)``, ``x`` ``(B, M, n)`` -> ``(B, M, n)``; differentiable in both."""
        if values.ndim != 2 or values.shape[1] != self.nnz:
            raise ValueError(f"`values` must have shape (batch, {self.nnz}), got {values.shape}")
        if x.ndim != 3 or x.shape[0] != values.shape[0] or x.shape[2] != self.space.n_dofs:
            raise ValueError(
                f"`x` must have shape ({values.shape[0]}, M, {self.space.n_dofs}), "
                f"got {tuple(x.shape)}"
            )
        if transpose:  # the DOF graph is symmetric: Jᵀ has J's pattern, its entries reordered
            values = self.pattern.reordered(values)
        return self.pattern.rows(values, x.transpose(1, 2)).transpose(1, 2)

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The entries ``(B, nnz)`` of ``left_b right_bᵀ`` on the pattern, from
        ``(B, n)`` and ``(B, n)``: the gradient with respect to ``J``'s entries of
        ``leftᵀ J right``."""
        return self.pattern.outer(left, right)

    def jacobi(
        self,
        values: torch.Tensor,
        offset: torch.Tensor,
        step: torch.Tensor,
        u: torch.Tensor,
        *,
        sweeps: int,
    ) -> torch.Tensor:
        """``u`` ``(B, n)`` after ``sweeps`` sweeps ``u ← u - step ⊙ (J u + offset)``,
        ``J``'s entries ``values`` ``(B, nnz)``, ``offset`` and ``step`` ``(B, n)``: with
        ``step = ω / diag(J)``, damped Jacobi on ``J u + offset = 0``. Differentiable
        in all four, by a backward pass written out (:class:`_JacobiSweeps`)."""
        if values.ndim != 2 or values.shape[1] != self.nnz:
            raise ValueError(f"`values` must have shape (batch, {self.nnz}), got {values.shape}")
        shape = (values.shape[0], self.space.n_dofs)
        for name, x in (("offset", offset), ("step", step), ("u", u)):
            if x.shape != shape:
                raise ValueError(f"`{name}` must have shape {shape}, got {tuple(x.shape)}")
        if not sweeps:
            return u
        dtype = values.dtype
        offset, step, u = offset.to(dtype), step.to(dtype), u.to(dtype)
        return _JacobiSweeps.apply(values, offset, step, u, self.pattern, int(sweeps))

    @property
    def entry_rows(self) -> torch.Tensor:
        """``(nnz,)``: each entry's row."""
        return self.pattern.row

    def local_slots(self) -> np.ndarray:
        """``(N, N, E)``: where entry ``(i, j)`` of cell ``e``'s local matrix lands in
        the pattern's entries, for assembling a Jacobian cell by cell."""
        dofs = self.space.basis.element_dofs
        rows = np.broadcast_to(dofs[:, None, :], (dofs.shape[0], *dofs.shape))
        cols = np.broadcast_to(dofs[None, :, :], rows.shape)
        positions = np.asarray(self._positions[rows.ravel(), cols.ravel()]).astype(np.int64)
        return positions.reshape(rows.shape) - 1

    def entries(self, matrix: scipy.sparse.sparray) -> torch.Tensor:
        """``(nnz,)`` float64: a SciPy ``(n, n)`` matrix's entries on the pattern.

        Raises:
            ValueError: the matrix has entries outside the pattern."""
        matrix = scipy.sparse.csr_array(matrix)
        coo = matrix.tocoo()
        slots = np.asarray(self._positions[coo.row, coo.col]).astype(np.int64).ravel() - 1
        if (slots < 0).any():
            raise ValueError("the matrix has entries outside the FE pattern")
        return torch.from_numpy(np.bincount(slots, weights=coo.data, minlength=self.nnz))

    def blocks(self, rows: list[np.ndarray], cols: list[np.ndarray]) -> JacobianBlocks:
        """The blocks ``J[rows[k], cols[k]]`` of ``k`` subdomains (see :class:`JacobianBlocks`)."""
        return JacobianBlocks(self._positions, rows, cols)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, n, n)`` dense copies of the matrices (for tests and small problems)."""
        n = self.space.n_dofs
        out = values.new_zeros(values.shape[0], n, n)
        out[:, self.pattern.row, self.pattern.col] = values
        return out


class JacobianBlocks(nn.Module):
    """Diagonal blocks ``J[rows_k, cols_k]`` of a Jacobian for ``k`` subdomains, as one
    block-diagonal pattern: a product costs the blocks' entries, not the whole
    matrix's. Subdomain fields are padded to the longest set (``m`` columns,
    ``m_r`` rows); padding has no entries.

    Shapes:
        :meth:`matmul`: the Jacobian's entries ``(B, nnz)``, fields ``(B, k, M, m)``
        -> ``(B, k, M, m_r)``.
    """

    def __init__(self, positions: scipy.sparse.csr_array, rows, cols):
        super().__init__()
        if len(rows) != len(cols):
            raise ValueError(f"{len(rows)} row sets but {len(cols)} column sets")
        self.width, self.height = max(map(len, cols)), max(map(len, rows))
        blocks = [positions[r][:, c] for r, c in zip(rows, cols, strict=True)]
        padded = [
            scipy.sparse.csr_array(
                (b.data, b.indices, np.r_[b.indptr, [b.indptr[-1]] * (self.height - len(r))]),
                shape=(self.height, self.width),
            )
            for b, r in zip(blocks, rows, strict=True)
        ]
        matrix = scipy.sparse.csr_array(scipy.sparse.block_diag(padded, format="csr"))
        matrix.sort_indices()
        # the entries of the blocks, in their pattern's order, as positions in J's
        self.register_buffer(
            "take", torch.from_numpy(matrix.data.astype(np.int64) - 1), persistent=False
        )
        self.pattern = _CSRPattern(matrix)

    def matmul(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``J[rows_k, cols_k] x_k`` for every subdomain ``k`` and batch element."""
        batch, k, fields, _ = x.shape
        columns = x.permute(0, 1, 3, 2).reshape(batch, k * self.width, fields)
        out = self.pattern.rows(take_columns(values, self.take), columns)
        return out.reshape(batch, k, self.height, fields).transpose(-1, -2)
