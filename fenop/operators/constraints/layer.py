"""The machinery both constraint layers share: the residual, its linearisation on
the FE pattern, the experts' systems for the layer's condition
(:mod:`~fenop.operators.constraints.conditions`), their solves (a linear one, or a
root finder's with the implicit function theorem's gradient) and the global solve."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from torch import nn

from fenop._checks import is_int
from fenop.fem.jacobian import JacobianPattern, take_columns
from fenop.operators.constraints.coarse import CoarseSpace, auto_resolution
from fenop.operators.constraints.common import (
    _CONDITION_LIMIT,
    CONDITIONS,
    GLOBAL_SOLVES,
    Condition,
    GlobalSolve,
    _needs_gradient,
    free_dofs,
)
from fenop.operators.constraints.conditions import RULES
from fenop.operators.constraints.factorisation import DenseSystems
from fenop.operators.constraints.fields import (
    _basis_in_float64,
    _combined,
    _IndexSets,
    _jvp,
    _tested,
)
from fenop.operators.constraints.galerkin import _galerkin_solve, _grid_galerkin_solve
from fenop.operators.constraints.residual import AssembledJacobian, missing_members
from fenop.operators.constraints.roots import (
    LevenbergMarquardt,
    Linearisation,
    Newton,
    Stopping,
)
from fenop.operators.implicit import implicit_root

# Damped Jacobi's weight: 2/3 damps the upper half of a P1 Laplacian's spectrum
# (the error at the mesh's scale) by at least a factor of 3 a sweep.
_JACOBI_WEIGHT = 2 / 3


class _Constraint(nn.Module):
    """What both constraints share: the residual, its checks, the experts' solves,
    and the options of :class:`~fenop.operators.HardConstraint`, which adds none."""

    # whether forward takes basis fields as values on a grid (HardConstraint's)
    takes_grid_basis = False

    def __init__(
        self,
        residual: nn.Module,
        *,
        condition: Condition = "galerkin",
        ridge: float = 1e-12,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
        chord: bool = True,
        smoothing: int = 4,
        global_solve: GlobalSolve = "auto",
        coarse_grid: int | str = "auto",
        conserve: bool = True,
        frozen_jacobian: bool = False,
    ):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"`condition` must be one of {CONDITIONS}, got {condition!r}")
        if global_solve not in GLOBAL_SOLVES:
            raise ValueError(f"`global_solve` must be one of {GLOBAL_SOLVES}, got {global_solve!r}")
        if not 0 <= ridge < math.inf:
            raise ValueError(f"`ridge` must be non-negative and finite, got {ridge}")
        if max_iterations < 1 or not 0 < tolerance < math.inf:
            raise ValueError(
                "`max_iterations` must be positive and `tolerance` positive, got "
                f"{max_iterations} and {tolerance}"
            )
        if not is_int(smoothing) or smoothing < 0:
            raise ValueError(f"`smoothing` must be a non-negative int, got {smoothing!r}")
        if coarse_grid != "auto" and (
            not is_int(coarse_grid) or coarse_grid < 0 or coarse_grid in (1, 2)
        ):
            raise ValueError(
                '`coarse_grid` must be "auto", 0 (none) or an int of at least 3 (grid '
                f"points per axis), got {coarse_grid!r}"
            )
        if missing := missing_members(residual):
            raise TypeError(
                f"`residual` lacks {', '.join(missing)}: a constraint's residual has the "
                "members of fenop.operators.constraints.Residual (DirichletResidual has them)"
            )
        self.residual, self.condition, self.ridge = residual, condition, float(ridge)
        self.rule = RULES[condition]
        self.affine = bool(residual.affine)
        # the residual's conservation law, imposed exactly (see _conserved)
        self.conserves = bool(conserve) and bool(getattr(residual, "conserved", False))
        if self.conserves and not self.affine:
            raise ValueError(
                "the residual declares a conservation law (`conserved`), which a "
                "constraint imposes exactly only for an affine residual; pass "
                "conserve=False"
            )
        # a residual that assembles its own Jacobian, in one pass
        self.assembled = isinstance(residual, AssembledJacobian)
        self.max_iterations, self.tolerance = int(max_iterations), float(tolerance)
        self.chord, self.smoothing = bool(chord), int(smoothing)
        if global_solve == "auto":  # measured best for each (HardConstraint's docstring)
            global_solve = "newton" if getattr(residual, "time_step", False) else "linearised"
        self.global_solve = global_solve
        self.frozen_jacobian = bool(frozen_jacobian)
        self.space = residual.forms.space
        self.symmetric = self.rule.symmetric(residual)
        self.systems = DenseSystems(ridge=self.ridge, symmetric=self.symmetric)
        stopping = Stopping(max_iterations=self.max_iterations, tolerance=self.tolerance)
        if self.rule.needs_jacobian:
            self.root_finder = LevenbergMarquardt(systems=self.systems, stopping=stopping)
        else:  # chord iterations: the condition alone at each trial point
            self.root_finder = Newton(systems=self.systems, stopping=stopping, chord=self.chord)
        self.register_buffer("free", free_dofs(residual), persistent=False)
        # the Dirichlet DOFs' indices, found once (nonzero waits for the device)
        self.register_buffer("fixed", (~self.free).nonzero().squeeze(1), persistent=False)
        self.pattern = JacobianPattern(self.space)
        if coarse_grid == "auto":
            coarse_grid = auto_resolution(int(self.free.sum()), self.space.dim)
        self.coarse_grid = int(coarse_grid)  # grid points per axis, 0 for none
        self.coarse_space = None
        if self.coarse_grid:
            self.coarse_space = CoarseSpace(self.pattern, self.free, self.coarse_grid)
        # the coarse correction is a Galerkin solve whatever the layer's condition
        self.coarse_symmetric = bool(residual.symmetric)
        self.everywhere = _IndexSets(None, self.space.n_dofs)
        # the spans of the grids' hats that bases came on, by grid shape (_grid_space);
        # not submodules: built from the mesh on first use, moved to the basis' device
        self._grids: dict[tuple[int, ...], CoarseSpace] = {}
        self._pattern_checked = False
        self.report: dict[str, torch.Tensor] = {}

    def _check(self, prediction: torch.Tensor, basis: torch.Tensor) -> None:
        n = self.space.n_dofs
        if prediction.ndim != 3 or prediction.shape[1:] != (1, n):
            raise ValueError(
                f"`prediction` must have shape (batch, 1, {n}), got {tuple(prediction.shape)}"
            )
        batch = prediction.shape[0]
        on_grid = self.takes_grid_basis and basis.ndim == 2 + self.space.dim
        on_mesh = basis.ndim == 3 and basis.shape[2] == n
        if basis.ndim < 3 or basis.shape[0] != batch or not (on_grid or on_mesh):
            grid = f" or ({batch}, N, *grid)" if self.takes_grid_basis else ""
            raise ValueError(
                f"`basis` must have shape ({batch}, N, {n}){grid}, got {tuple(basis.shape)}"
            )

    def _grid_space(self, basis: torch.Tensor) -> CoarseSpace | None:
        """For basis fields given on a grid over the mesh's bounding box, ``(B, N,
        *grid)``, the span of that grid's hats at the free DOFs (made on the first
        basis on that grid); ``None`` for fields on the mesh ``(B, N, n)``."""
        if not self.takes_grid_basis or basis.ndim != 2 + self.space.dim:
            return None  # on the mesh, or a shape that _check refuses
        shape = tuple(basis.shape[2:])
        if shape not in self._grids:
            self._grids[shape] = CoarseSpace(self.pattern, self.free, shape, independent=False)
        return self._grids[shape].to(basis.device)

    def _residual_of(self, u: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``R(u; inputs)`` for ``u`` ``(B, ..., n)``, inputs ``(B, n)`` broadcast over ``...``."""
        extra = u.ndim - 2
        spread = {k: v.reshape(v.shape[0], *(1,) * extra, v.shape[-1]) for k, v in inputs.items()}
        return self.residual(u, **spread)

    def _linearise(self, u: torch.Tensor, inputs: dict, cells=None):
        """``R(u)`` ``(B, n)`` and the entries ``(B, nnz)`` of ``J(u)`` on the FE pattern,
        from one residual evaluation per colour of the pattern's columns (for an
        affine residual call it at ``u = 0``: ``J`` is the same everywhere). With
        ``cells`` (a subset of the forms' cells) the residual sees only those:
        exact at the rows whose cells all are in it, at their cost. A residual that
        assembles its Jacobian (``residual.linearised``) is linearised by it instead,
        in one pass."""
        with self._on(cells):
            return self._linearise_here(u, inputs)

    def _on(self, cells):
        """The residual's forms restricted to ``cells`` (nothing for ``None``)."""
        return contextlib.nullcontext() if cells is None else self.residual.forms.on(cells)

    def _linearise_here(self, u: torch.Tensor, inputs: dict):
        assembled = self.assembled and not self.affine
        out = self.residual.linearised(self.pattern, u, **inputs) if assembled else None
        if out is not None:
            r, values = out
            if not self._pattern_checked:
                self._check_pattern(u, inputs, r, values)
            return r, values
        seeds = self.pattern.seeds.to(u.dtype).expand(len(u), -1, -1)
        if self.affine:
            # J s = R(u + s) - R(u) exactly for an affine R; one call for all the fields
            out = self._residual_of(torch.cat([u[:, None], u[:, None] + seeds], dim=1), inputs)
            r, products = out[:, 0], out[:, 1:] - out[:, :1]
        else:
            r = self._residual_of(u, inputs)
            products = _jvp(lambda v: self._residual_of(v, inputs), u[:, None], seeds)
        values = self.pattern.values(products)
        if not self._pattern_checked:
            self._check_pattern(u, inputs, r, values)
        return r, values

    def _check_pattern(self, u, inputs, r, values) -> None:
        """Once: the recovered ``J`` against a direct linearisation along a random field.
        A residual coupling DOFs that share no cell has a Jacobian outside the FE
        pattern, and the colouring would mix its entries."""
        with torch.no_grad():
            v = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
            v = v.to(u.device)
            if self.affine:
                direct = self._residual_of(u + v, inputs) - r
            else:
                direct = _jvp(lambda x: self._residual_of(x, inputs), u, v)
            recovered = self.pattern.matmul(values, v[:, None])[:, 0]
            error = (recovered - direct).norm() / direct.norm().clamp_min(1e-300)
        if not error <= 1e-8:
            raise ValueError(
                "the residual's Jacobian does not fit the FE pattern (it couples DOFs that "
                f"share no cell: relative error {float(error):.1e} of its recovered "
                "products); hard constraints need a residual assembled cell by cell"
            )
        self._pattern_checked = True

    def _residual_from(self, u: torch.Tensor, linear: tuple | None, inputs: dict):
        """``R(u)`` ``(B, n)``: for an affine residual ``J u + R(0)`` from its
        linearisation ``(R(0), J)`` (a sparse product), else evaluated."""
        if linear is None:
            return self._residual_of(u, inputs)
        return self._affine_residual(u, linear)

    def _affine_residual(self, u: torch.Tensor, linear: tuple) -> torch.Tensor:
        """``J u + R(0)`` ``(B, n)`` for the affine residual ``linear = (R(0), J)``."""
        r0, values = linear
        return self.pattern.matmul(values, u[:, None])[:, 0] + r0

    def _system(self, r, values, local, sets):
        """The experts' condition and its (Gauss-Newton, for least squares) matrix:
        ``F (B, k, N)``, ``M (B, k, N, N)``, for experts of bases ``local``
        ``(B, k, N, m)`` on their extended sets. ``r`` ``(B, n)`` and ``values`` are
        ``R`` and ``J`` at the current field; ``sets`` the experts' (extended, rows)
        index sets and their blocks of ``J`` (``None``: one expert, the whole domain).
        Also the test fields (:meth:`Galerkin.test_fields
        <fenop.operators.constraints.conditions.Galerkin.test_fields>`)."""
        _, rows, blocks = sets
        if blocks is None:
            applied = self.pattern.matmul(values, local[:, 0])[:, None]
        else:
            applied = blocks.matmul(values, local)  # J (χ_k Φ) on expert k's rows
        test = self.rule.test_fields(local, applied)
        return _tested(test, rows.gather(r)), test @ applied.transpose(-1, -2), test

    def _experts(
        self, u, local, sets, inputs, linear=None, cache=None, cells=None, r=None, data=None
    ):
        """Coefficients ``(B, k, N)`` of experts (territories that do not meet) solved
        from ``u`` ``(B, n)``: for an affine residual, whose linearisation ``linear`` is
        the forward call's, one solve (the matrix, which does not depend on ``u``, kept
        in ``cache`` with its factors and the test fields), from ``r = R(u)`` where
        the caller has it; Newton's method otherwise (:meth:`_nonlinear`). A residual
        that is not affine but given with its linearisation (``linear``) is solved as
        that affine one. Also whether each succeeded, the condition numbers, the
        iterations."""
        if linear is None:
            return self._nonlinear(u, local, sets, inputs, cells, data)
        if r is None:
            r = self._residual_from(u, linear, inputs)
        if cache is not None and "factors" in cache:
            f_value = _tested(cache["test"], sets[1].gather(r))
            factors, condition = cache["factors"], cache["condition"]
        else:
            f_value, matrix, test = self._system(r, linear[1], local, sets)
            factors = self.systems.factorise(matrix)
            condition = factors.condition()
            if cache is not None:
                cache.update(test=test, factors=factors, condition=condition)
        w, ok = factors.solve(-f_value)
        return w, ok, condition, torch.ones_like(ok, dtype=torch.int64)

    def _data_norm(self, u: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``(B,)``: the norm of the residual of the zero field (shaped like ``u``
        ``(B, n)``) on the free DOFs, the scale of the data that Newton's convergence
        test is relative to."""
        with torch.no_grad():
            zero = self._residual_of(torch.zeros_like(u), inputs)
            return torch.where(self.free, zero, 0.0).norm(dim=-1)

    def _nonlinear(self, u, local, sets, inputs, cells=None, data=None):
        """:meth:`_experts` for a residual that is not affine: the root finder's root,
        whose convergence test is relative to ``data`` ``(B,)`` (:meth:`_data_norm`,
        found here if not given), with the implicit function theorem's gradient."""
        if data is None:
            data = self._data_norm(u, inputs)
        problem = _ExpertProblem(self, u, local, sets, inputs, cells)
        result = self.root_finder.solve(problem, local.new_zeros(local.shape[:3]), data)
        w = result.solution
        jacobian = None  # autograd's, from the condition (least squares' Gauss-Newton
        if self.rule.exact_matrix:  # matrix is not its exact Jacobian)
            jacobian = result.matrix
            # a chord iteration's matrix is the first iterate's: the one at the root
            if self.root_finder.chord and _needs_gradient(u, local, inputs):
                with torch.no_grad():
                    jacobian = problem.linearised(w).matrix
        names = list(inputs)

        def condition_of(w, u, local, *values):
            ins = dict(zip(names, values, strict=True))
            return _ExpertProblem(self, u, local, sets, ins, cells).value(w)

        values = (inputs[name] for name in names)
        w = implicit_root(condition_of, w, u, local, *values, jacobian=jacobian, ridge=self.ridge)
        return w, result.converged, result.condition, result.iterations

    def _prepare(self, prediction, basis, inputs, *, node_major: bool = False, grid=None):
        """The prediction ``(B, n)``, the basis ``(B, N, n)`` and the inputs in float64,
        the basis zero on the Dirichlet DOFs. ``node_major``: the basis stored as
        ``(B, n, N)`` (a transposed view of it returned), the layout of a sparse
        product of ``J`` with all its fields, which otherwise copies them into it
        (at 6.6e4 DOFs, batch 8, N = 8, the copy took as long as the product).
        ``grid``: the basis is on that grid (:meth:`_grid_space`), and its fields are
        returned as the grid's hats' coefficients ``(B, N, m)``."""
        self._check(prediction, basis)
        # float64 throughout: the small systems are ill-conditioned in float32
        g = prediction[:, 0].double()
        if grid is not None:
            phi = grid.from_grid(basis).double()
        else:
            phi = _basis_in_float64(basis, self.fixed.to(basis.device), node_major=node_major)
        if self.conserves:  # the constant joins the basis: its Galerkin test is the balance
            if grid is not None:  # the hats sum to 1 at the free DOFs
                ones = phi.new_ones(len(phi), 1, grid.size)
            else:
                ones = self.free.to(basis.device, phi.dtype).expand(len(phi), 1, -1)
            phi = torch.cat([phi, ones], dim=1)
        return g, phi, {k: v.double() for k, v in inputs.items()}

    def _global(self, u, phi, inputs, linear=None, data=None, grid=None):
        """One solve over the whole domain: ``u + Φ w`` with the condition of the
        residual, or of the affine one ``linear`` where given (for a residual that is
        not affine, a linearisation: one Newton step). ``grid``: ``phi`` holds the
        coefficients of the fields in that grid's hats (:meth:`_prepare`), which
        only the Galerkin solve of a linear system takes (``takes_grid_basis``)."""
        if linear is not None and self.rule is RULES["galerkin"]:
            if grid is not None:
                r = self._affine_residual(u, linear)
                entries = self._entries_on(grid, inputs, linear[1])
                out, ok, condition = _grid_galerkin_solve(u, r, phi, grid, entries, self.systems)
            else:
                out, ok, condition = _galerkin_solve(u, phi, *linear, self.pattern, self.systems)
            return out, ok, condition, torch.ones_like(condition, dtype=torch.int64)
        if grid is not None:
            raise AssertionError("a basis on a grid reached a solve that does not take one")
        sets = (self.everywhere, self.everywhere, None)
        w, ok, condition, iterations = self._experts(
            u, phi[:, None], sets, inputs, linear, data=data
        )
        return u + (w @ phi)[:, 0], ok[:, 0], condition, iterations

    def _linearised_at(self, u, inputs):
        """The residual's linearisation at ``u`` as an affine residual's ``(R(0), J)``,
        ``(R(u) - J u, J(u)'s entries)``, and ``R(u)`` ``(B, n)``; differentiable in
        ``u`` and the inputs."""
        r, values = self._linearise(u, inputs)
        return (r - self.pattern.matmul(values, u[:, None])[:, 0], values), r

    def _stage_linear(self, u, inputs, linear, wanted):
        """The affine residual a stage of the cycle solves from ``u`` ``(B, n)``, as
        ``(R(0), J)``: an affine residual's own ``linear``; for one that is not
        affine, where ``wanted``, its linearisation at ``u`` (:meth:`_linearised_at`),
        so that each sweep or correction of the stage is a sparse product instead of
        a residual evaluation or a linearisation of its own (with
        :attr:`frozen_jacobian`, found at ``u`` detached: a constant of the backward
        pass); else ``None``."""
        if self.affine or not wanted:
            return linear
        if self.frozen_jacobian:
            u = u.detach()
        return self._linearised_at(u, inputs)[0]

    def _linear_part(self, u, inputs):
        """For an affine residual, ``(R(0), J)``: all that its solves need, found once
        per call. It depends on the inputs alone, so when they are data (no gradient)
        the residual's evaluations leave nothing for the backward pass."""
        if not self.affine:
            return None
        zero = torch.zeros_like(u)
        entries = self.residual.jacobian_entries(self.pattern, **inputs) if self.assembled else None
        if entries is None:  # recovered from one linearisation per colour
            return self._linearise(zero, inputs)
        r0 = self.residual.offset(**inputs)
        if r0 is None:
            r0 = self._residual_of(zero, inputs)
        r0 = r0.to(u.dtype)
        if not self._pattern_checked:  # the residual's own J, checked once like a recovered one
            self._check_pattern(zero, inputs, r0, entries)
        return r0, entries.to(u.dtype)

    def _smoothed(self, u: torch.Tensor, linear, dtype: torch.dtype) -> torch.Tensor:
        """``u`` ``(B, n)`` after :attr:`smoothing` sweeps of damped Jacobi on the FE
        system ``linear`` (``(R(0), J)``: a residual's own, or a linearisation,
        :meth:`_stage_linear`), ``u ← u - ω D⁻¹ (J u + R(0))`` on the free DOFs
        (``D`` the diagonal of ``J``). The smoother of a multigrid: it removes the
        error at the mesh's own scale, which a basis the network emits on a coarser
        grid cannot carry and a Galerkin solve then trades against the smooth
        error; each sweep costs one product with ``J``. Differentiable.

        The sweeps run in ``dtype``, the output's precision (float32 for half
        precisions), and return ``u``'s: a smoother's rounding stays at that
        precision, unlike a solve's, which its condition number multiplies. In
        float32 a sparse product moves two thirds of the bytes: the global
        default's forward and backward passes took a fifth less time (Darcy at
        6.6e4 DOFs, batch 8; BENCHMARKS.md, "The sweeps in the output's
        precision"), its float32 output within float32's rounding of the float64
        sweeps'."""
        if not self.smoothing:
            return u
        r0, values = linear
        diagonal = take_columns(values, self.pattern.diagonal)
        step = torch.where(self.free & (diagonal != 0), _JACOBI_WEIGHT / diagonal, 0.0)
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        # jacobi works in its entries' precision
        return self.pattern.jacobi(values.to(dtype), r0, step, u, sweeps=self.smoothing).to(u.dtype)

    def _entries_on(self, space: CoarseSpace, inputs: dict, values: torch.Tensor):
        """``Pᵀ J P``'s entries ``(B, s)`` for the hats ``P`` of ``space``
        (:meth:`CoarseSpace.entries
        <fenop.operators.constraints.coarse.CoarseSpace.entries>`): from the inputs
        alone for an affine residual whose Jacobian is linear in one of them
        (``residual.jacobian_map``: Darcy's in ``a``), else from ``J``'s entries
        ``values`` ``(B, nnz)``."""
        mapped = getattr(self.residual, "jacobian_map", None)
        if self.affine and mapped is not None:
            name, to_entries = mapped(self.pattern)
            return space.entries_from(to_entries, inputs[name])
        return space.entries(values)

    def _coarse_corrected(self, u: torch.Tensor, linear, inputs: dict):
        """``u + P c`` ``(B, n)`` with ``Pᵀ (J (u + P c) + R(0)) = 0`` for the affine
        residual ``linear`` (``(R(0), J)``, as :meth:`_smoothed` takes it): the
        Galerkin correction in the coarse space (:attr:`coarse_grid`), and whether
        each solve succeeded ``(B,)``. The coarse space holds the smooth part of the
        error, which the network's basis misses on a mesh finer than its grid;
        differentiable."""
        if self.coarse_space is None:
            return u, torch.ones(len(u), dtype=torch.bool, device=u.device)
        r = self._affine_residual(u, linear)
        entries = self._entries_on(self.coarse_space, inputs, linear[1])
        factors = self.coarse_space.factorised(
            entries, ridge=self.ridge, symmetric=self.coarse_symmetric
        )
        c, ok = factors.solve(-self.coarse_space.restrict(r))
        return u + self.coarse_space.prolong(c), ok

    def _conserved(self, u: torch.Tensor, linear) -> torch.Tensor:
        """``u + c`` ``(B, n)``, ``c`` ``(B, 1)`` constant on the free DOFs, with the sum
        of the residual over the free DOFs zero: where the residual is a conservation
        law's (``residual.conserved``, e.g. heat with no-flux boundaries), its
        discrete balance, exactly: the Galerkin condition tested against the
        constant field. The constant is also among the solves' basis fields
        (:meth:`_prepare`), but the sweeps and the grid after the solve leave the
        balance off by their own error; this last correction restores it. Measured
        on a no-flux heat rollout (BENCHMARKS.md, "The constraint per time step"):
        the mass kept to rounding, and the solve alone 3x more accurate. ``linear``
        is the affine residual's ``(R(0), J)``; differentiable."""
        if not self.conserves:
            return u
        ones = self.free.to(u.dtype).expand_as(u)
        balance = torch.where(self.free, self._affine_residual(u, linear), 0.0).sum(-1)
        applied = self.pattern.matmul(linear[1], ones[:, None])[:, 0]
        weight = torch.where(self.free, applied, 0.0).sum(-1)  # 1ᵀ J 1: heat's ∫ 1
        return u - (balance / weight)[:, None] * ones

    def _finish(self, u, ok, conditions, iterations, dtype, inputs: dict) -> torch.Tensor:
        """The output ``(B, 1, n)``, and :attr:`report` of this call, per sample:
        ``converged`` (every solve factorised and finite, every Newton iteration
        converged), ``singular`` (how many of its systems were numerically singular,
        solved through the ridge), ``condition`` (the largest condition number),
        ``iterations`` (sweeps, or for a nonlinear residual the Newton iterations of
        all its solves) and ``residual_norm`` (of the output, free DOFs), which is
        evaluated when first read: training reads none, and for a residual that
        is not affine the evaluation was an eighth of the global default's step
        (nonlinear diffusion at 6.6e4 DOFs, batch 8)."""
        output, fields = u.detach(), {k: v.detach() for k, v in inputs.items()}

        def residual_norm() -> torch.Tensor:
            with torch.no_grad():
                r = torch.where(self.free, self._residual_of(output, fields), 0.0)
                return r.norm(dim=-1).cpu()

        with torch.no_grad():
            conditions = torch.cat(conditions, dim=1) if conditions else u.new_zeros(len(u), 1)
            self.report = _Report(
                {
                    "converged": ok.detach().cpu(),
                    "singular": (~(conditions < _CONDITION_LIMIT)).sum(dim=1).cpu(),
                    "condition": conditions.amax(dim=1).cpu(),
                    "iterations": iterations.cpu(),
                },
                residual_norm=residual_norm,
            )
        return u.to(dtype)[:, None]


class _Report(Mapping):
    """A constraint call's report (:meth:`_Constraint._finish`): tensors per sample,
    ``residual_norm`` made by its function when first read."""

    def __init__(self, values: dict[str, torch.Tensor], *, residual_norm):
        self._values, self._residual_norm = values, residual_norm

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "residual_norm" and key not in self._values:
            self._values[key] = self._residual_norm()
        return self._values[key]

    def __iter__(self):
        return iter([*(k for k in self._values if k != "residual_norm"), "residual_norm"])

    def __len__(self) -> int:
        return len(list(iter(self)))


class _ExpertProblem:
    """Experts' nonlinear conditions as a root problem (:mod:`...roots
    <fenop.operators.constraints.roots>`): the coefficients ``w`` ``(B, k, N)`` of
    the field ``u + Σ_j w_j χ_k Φ_j``, for the layer's condition, with ``u``
    ``(B, n)``, the experts' bases ``local`` ``(B, k, N, m)`` and their index sets
    ``sets``; ``cells``, where given, the cells the residual is evaluated on."""

    def __init__(self, layer: _Constraint, u, local, sets, inputs: dict, cells):
        self.layer, self.u, self.local, self.sets = layer, u, local, sets
        self.inputs, self.cells = inputs, cells

    def rows(self, index: torch.Tensor) -> _ExpertProblem:
        """The problems of the samples ``index`` ``(b,)`` alone."""
        inputs = {name: value[index] for name, value in self.inputs.items()}
        return _ExpertProblem(
            self.layer, self.u[index], self.local[index], self.sets, inputs, self.cells
        )

    def field(self, w: torch.Tensor) -> torch.Tensor:
        return self.u + self.sets[0].scatter(_combined(w, self.local))

    def linearised(self, w: torch.Tensor) -> Linearisation:
        layer = self.layer
        r, values = layer._linearise(self.field(w), self.inputs, self.cells)
        f_value, matrix, test = layer._system(r, values, self.local, self.sets)
        return Linearisation(f_value, matrix, test, self.sets[1].gather(r).square().sum(-1))

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """The condition at ``w``; without linearising where it holds no ``J``."""
        if self.layer.rule.needs_jacobian:
            return self.linearised(w).value
        with self.layer._on(self.cells):
            r = self.layer._residual_of(self.field(w), self.inputs)
        return _tested(self.local, self.sets[1].gather(r))
