"""Hard constraints: outputs that satisfy the discrete PDE in a Galerkin (or least-squares) sense.

A network emits a prediction ``g`` and ``N`` basis fields ``Φ`` (zero on the
Dirichlet DOFs); the constrained output is ``u = g + Φ w`` with coefficients ``w``
that make the FE residual ``R(u; inputs)`` vanish against the basis:

- ``condition="galerkin"`` (default): ``Φᵀ R(g + Φ w) = 0``, the residual orthogonal
  to the basis. For an elliptic problem this is the energy-norm best fit in the
  span (Céa's lemma); measured 10x more accurate than least squares at the same
  cost (DESIGN, "Hard constraints").
- ``condition="least_squares"``: ``min_w |R(g + Φ w)|²``, the objective of
  Chalapathi et al. (ICLR 2024), which weights the error towards high frequencies.

:class:`HardConstraint` solves once over the whole domain. :class:`MoEConstraint`
splits the DOFs into subdomains (:mod:`fenop.fem.partition`) and lets each
"expert" solve for its own ``N`` coefficients on its extended set with the field
outside held at the current values, a few sweeps after an optional global solve
(the coarse level); each DOF then takes its owner's value. Gradients flow through
the solves: for a residual affine in ``u`` (Darcy, Poisson, a heat step) the solve
is exact, and autograd through it is the implicit gradient.

For a residual that is not affine in ``u`` (nonlinear diffusion) the global solve is
Newton's method on the ``N`` unknowns (Levenberg-Marquardt for least squares), with a
fixed iteration cap, per-problem convergence masks and no host synchronisation in
the loop; its backward pass is the implicit function theorem's with the exact
Jacobian (:mod:`fenop.operators.implicit`), in memory that does not grow with the
iterations. The experts' sweeps then solve the residual's linearisation at the
coarse solution (one Newton step of the two-level iteration, as cheap as an affine
residual's sweeps), or, ``nonlinear="newton"``, each expert its own nonlinear
problem the same way as the global solve.

The residual is a black box ``R(u, **inputs)``: its Jacobian is recovered on the
FE pattern from one linearisation per colour of the pattern's columns
(:class:`~fenop.fem.jacobian.JacobianPattern`, about 9 for P1 triangles), once per
call for an affine residual and once per Newton iteration otherwise, unless the
residual assembles it itself (``jacobian_entries`` for an affine residual,
``linearised`` for another: one pass instead of one per colour); every product
after that is sparse, each expert's with its own block of ``J``, so the layer's
cost and memory grow linearly with the mesh (BENCHMARKS.md).

Every solve is a small dense float64 system, symmetrically scaled to a unit
diagonal, with a small ridge; Cholesky where it is symmetric, LU otherwise. Its
condition number is monitored: ``report`` says, per sample, whether every solve
succeeded, how many systems were numerically singular (basis fields dependent on
an expert's patch: the ridge then picks the coefficients), how many sweeps ran,
and the residual norm of the output.

>>> import torch
>>> from fenop.data.pdes import get_pde
>>> from fenop.fem import FunctionSpace, MetisPartition, unit_square
>>> space = FunctionSpace(unit_square(17), dirichlet="boundary")
>>> darcy = get_pde("darcy")(space)
>>> sample = darcy.sample(0, 0)
>>> a, u = (torch.from_numpy(sample[k])[None] for k in ("a", "u"))
>>> basis = torch.stack([u[0], space.interpolate(lambda x: x[0] * (1 - x[0]) * x[1])])[None]
>>> moe = MoEConstraint(darcy.residual(), MetisPartition(experts=4), overlap=2, sweeps=2)
>>> out = moe(torch.zeros_like(u)[:, None], basis, a=a)
>>> bool(((out[:, 0] - u).norm() / u.norm()) < 1e-8), moe.report["converged"].tolist()
(True, [True])
"""

from __future__ import annotations

import contextlib
import math
import typing
from typing import Literal

import numpy as np
import scipy.sparse
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import forward_ad

from fenop.fem.jacobian import JacobianPattern
from fenop.operators import sharding
from fenop.operators.implicit import implicit_root, scaled_system

Condition = Literal["galerkin", "least_squares"]
Update = Literal["colours", "owners"]
# How MoEConstraint's experts treat a residual that is not affine (see its docstring).
Nonlinear = Literal["linearised", "newton"]
CONDITIONS, UPDATES, NONLINEAR = (typing.get_args(c) for c in (Condition, Update, Nonlinear))
# Solves whose scaled matrix is worse conditioned than this are reported as failed.
_CONDITION_LIMIT = 1e10
# Levenberg-Marquardt's first damping, relative to the Gauss-Newton matrix's diagonal.
_DAMPING = 1e-3


def _needs_gradient(*tensors) -> bool:
    """Whether autograd will want a gradient through any of ``tensors`` (or a dict's values)."""
    flat = [t for x in tensors for t in (x.values() if isinstance(x, dict) else [x])]
    return torch.is_grad_enabled() and any(t.requires_grad for t in flat)


def free_dofs(residual: nn.Module) -> torch.Tensor:
    """``(n_dofs,)`` bool: the DOFs a residual solves for, all but its Dirichlet DOFs
    (``residual.dirichlet``, where it has them), on the CPU."""
    mask = getattr(residual, "dirichlet", None)
    if mask is None:
        return torch.ones(residual.forms.space.n_dofs, dtype=torch.bool)
    return ~mask.detach().cpu()


class _Constraint(nn.Module):
    """What both constraints share: the residual, its checks, the experts' solves."""

    def __init__(
        self,
        residual: nn.Module,
        *,
        condition: Condition,
        ridge: float,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
        chord: bool = True,
    ):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"`condition` must be one of {CONDITIONS}, got {condition!r}")
        if not 0 <= ridge < math.inf:
            raise ValueError(f"`ridge` must be non-negative and finite, got {ridge}")
        if max_iterations < 1 or not 0 < tolerance < math.inf:
            raise ValueError(
                "`max_iterations` must be positive and `tolerance` positive, got "
                f"{max_iterations} and {tolerance}"
            )
        forms = getattr(residual, "forms", None)
        if forms is None or not hasattr(forms, "space"):
            raise TypeError("`residual` must know its space (residual.forms.space)")
        self.residual, self.condition, self.ridge = residual, condition, float(ridge)
        self.affine = bool(getattr(residual, "affine", False))
        self.max_iterations, self.tolerance = int(max_iterations), float(tolerance)
        self.chord = bool(chord)
        self.space = forms.space
        # Galerkin matrices Φᵀ J Φ are symmetric when J is on the free DOFs; the
        # (Gauss-Newton) normal equations of least squares always are.
        self.symmetric = condition == "least_squares" or bool(getattr(residual, "symmetric", False))
        self.register_buffer("free", free_dofs(residual), persistent=False)
        self.pattern = JacobianPattern(self.space)
        self.everywhere = _IndexSets(None, self.space.n_dofs)
        self._pattern_checked = False
        self.report: dict[str, torch.Tensor] = {}

    def _check(self, prediction: torch.Tensor, basis: torch.Tensor) -> None:
        n = self.space.n_dofs
        if prediction.ndim != 3 or prediction.shape[1:] != (1, n):
            raise ValueError(
                f"`prediction` must have shape (batch, 1, {n}), got {tuple(prediction.shape)}"
            )
        if basis.ndim != 3 or basis.shape[0] != prediction.shape[0] or basis.shape[2] != n:
            raise ValueError(
                f"`basis` must have shape ({prediction.shape[0]}, N, {n}), got {tuple(basis.shape)}"
            )

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
        assembled = None if self.affine else getattr(self.residual, "linearised", None)
        out = None if assembled is None else assembled(self.pattern, u, **inputs)
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
        r0, values = linear
        return self.pattern.matmul(values, u[:, None])[:, 0] + r0

    def _scaled(self, matrix: torch.Tensor):
        """``matrix`` ``(..., N, N)`` scaled to a unit diagonal and ridged, and the
        scale ``(..., N)`` (:func:`~fenop.operators.implicit.scaled_system`)."""
        return scaled_system(matrix, self.ridge)

    def _solve(self, matrix: torch.Tensor, rhs: torch.Tensor):
        """Solve ``matrix w = rhs`` for ``(..., N, N)`` and ``(..., N)``, scaled and
        ridged (:meth:`_scaled`). Returns ``w`` and whether each solve succeeded
        (factorised, finite)."""
        return self._solve_factored(self._factorise(matrix), rhs)

    def _factorise(self, matrix: torch.Tensor) -> tuple:
        """The factors of ``matrix`` ``(..., N, N)`` scaled and ridged, for
        :meth:`_solve_factored`: Cholesky's (an identity where it failed, so that
        its solves give no NaN) or LU's, the scale ``(..., N)``, and whether each
        factorised ``(...)``."""
        scaled, scale = self._scaled(matrix)
        pivots = None
        if self.symmetric:
            factor, info = torch.linalg.cholesky_ex(scaled)
            ok = info == 0
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            factor = torch.where(ok[..., None, None], factor, eye)
        else:
            factor, pivots, info = torch.linalg.lu_factor_ex(scaled)
            ok = info == 0
        with torch.no_grad():
            ok = ok & torch.isfinite(scaled).all(dim=(-1, -2))
        return factor, pivots, scale, ok

    def _solve_factored(self, factors: tuple, rhs: torch.Tensor, *, adjoint: bool = False):
        """``w`` ``(..., N)`` solving the system of ``factors`` (:meth:`_factorise`)
        for ``rhs`` ``(..., N)`` (``adjoint``: its transpose), and whether each
        solve succeeded."""
        factor, pivots, scale, ok = factors
        b = (scale * rhs)[..., None]
        if pivots is None:  # symmetric
            y = torch.cholesky_solve(b, factor)
        else:
            y = torch.linalg.lu_solve(factor, pivots, b, adjoint=adjoint)
        w = scale * y[..., 0]
        with torch.no_grad():
            ok = ok & torch.isfinite(w).all(dim=-1)
        return w, ok

    def _condition(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(...)``: the 2-norm condition numbers of the scaled systems that
        :meth:`_solve` factorises for ``matrix`` ``(..., N, N)`` (infinite where not
        finite). Above ``1e10`` a system is numerically singular (basis fields
        dependent where it lives), and the ridge picks its coefficients. Asked once
        per matrix, not per solve: an SVD costs more than the solve (measured: a
        tenth of a nonlinear expert sweep's forward pass)."""
        with torch.no_grad():
            scaled = self._scaled(matrix.detach())[0]
            finite = torch.isfinite(scaled).all(dim=(-1, -2))
            condition = torch.full_like(scaled[..., 0, 0], math.inf)
            good = scaled[finite]
            if self.symmetric:  # |λ|max / |λ|min, the SVD's ratio, from eigvalsh
                magnitudes = torch.linalg.eigvalsh(good).abs()
                condition[finite] = magnitudes.amax(dim=-1) / magnitudes.amin(dim=-1)
            else:
                condition[finite] = torch.linalg.cond(good)
        return condition

    def _system(self, r, values, local, sets):
        """The experts' condition and its (Gauss-Newton, for least squares) matrix:
        ``F (B, k, N)``, ``M (B, k, N, N)``, for experts of bases ``local``
        ``(B, k, N, m)`` on their extended sets. ``r`` ``(B, n)`` and ``values`` are
        ``R`` and ``J`` at the current field; ``sets`` the experts' (extended, rows)
        index sets and their blocks of ``J`` (``None``: one expert, the whole domain).
        Also the test fields, ``χ_k Φ`` (Galerkin) or ``J (χ_k Φ)`` on the rows, and
        ``J (χ_k Φ)`` on the rows ``(B, k, N, m_r)``."""
        _, rows, blocks = sets
        if blocks is None:
            applied = self.pattern.matmul(values, local[:, 0])[:, None]
        else:
            applied = blocks.matmul(values, local)  # J (χ_k Φ) on expert k's rows
        test = local if self.condition == "galerkin" else applied
        f_value = _tested(test, rows.gather(r))
        matrix = test @ applied.transpose(-1, -2)
        return f_value, matrix, test, applied

    def _experts(
        self, u, local, sets, inputs, linear=None, cache=None, cells=None, r=None, data=None
    ):
        """Coefficients ``(B, k, N)`` of experts (territories that do not meet) solved
        from ``u`` ``(B, n)``: for an affine residual, whose linearisation ``linear`` is
        the forward call's, one solve (the matrix, which does not depend on ``u``, kept
        in ``cache`` with its factors and the test fields), from ``r = R(u)`` where
        the caller has it; Newton's method otherwise, with the implicit function
        theorem's gradient, whose convergence test is relative to ``data`` ``(B,)``
        (:meth:`_data_norm`, found here if not given). A residual that is not affine
        but given with its linearisation (``linear``) is solved as that affine one.
        Also whether each succeeded, the condition numbers, the iterations."""
        if linear is not None:
            if r is None:
                r = self._residual_from(u, linear, inputs)
            if cache is not None and "factors" in cache:
                f_value = _tested(cache["test"], sets[1].gather(r))
                factors, condition = cache["factors"], cache["condition"]
            else:
                f_value, matrix, test, _ = self._system(r, linear[1], local, sets)
                factors, condition = self._factorise(matrix), self._condition(matrix)
                if cache is not None:
                    cache.update(test=test, factors=factors, condition=condition)
            w, ok = self._solve_factored(factors, -f_value)
            return w, ok, condition, torch.ones_like(ok, dtype=torch.int64)
        return self._newton(u, local, sets, inputs, cells, data)

    def _data_norm(self, u: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``(B,)``: the norm of the residual of the zero field (shaped like ``u``
        ``(B, n)``) on the free DOFs, the scale of the data that Newton's convergence
        test is relative to."""
        with torch.no_grad():
            zero = self._residual_of(torch.zeros_like(u), inputs)
            return torch.where(self.free, zero, 0.0).norm(dim=-1)

    def _newton(self, u, local, sets, inputs, cells=None, data=None):
        batch, k, n_basis, _ = local.shape
        extended, rows, _ = sets
        names = list(inputs)

        def field(w, u, local):
            return u + extended.scatter(_combined(w, local))

        def system(w, u, local, inputs):
            """The condition, its matrix, the test fields and least squares' objective
            |R|² on each expert's rows ``(B, k)``, at ``w``."""
            r, values = self._linearise(field(w, u, local), inputs, cells)
            f_value, matrix, test, _ = self._system(r, values, local, sets)
            return f_value, matrix, test, rows.gather(r).square().sum(-1)

        def condition_only(w, u, local, inputs):
            """Galerkin's condition at ``w`` without linearising: one residual evaluation."""
            with self._on(cells):
                r = self._residual_of(field(w, u, local), inputs)
            return _tested(local, rows.gather(r))

        # Chord iterations (Galerkin): the matrix of the first iterate is kept, so an
        # iteration costs one residual evaluation, not a linearisation (one per
        # colour of the pattern); the root is the same. Least squares' condition
        # holds J itself, so it linearises every iteration.
        chord = self.chord and self.condition == "galerkin"

        damped = self.condition == "least_squares"
        with torch.no_grad():
            if data is None:
                data = self._data_norm(u, inputs)
            w = local.new_zeros(batch, k, n_basis)
            ok = torch.ones(batch, k, dtype=torch.bool, device=local.device)
            done = torch.zeros_like(ok)
            iterations = torch.zeros(batch, k, dtype=torch.int64, device=local.device)
            f_value, matrix, test, current = system(w, u, local, inputs)
            # Levenberg-Marquardt (least squares): λ per problem, Marquardt's scaling
            damping = local.new_full((batch, k), _DAMPING)
            # Problems that have converged are left as they are. On a GPU the loop runs
            # its full count, with no host synchronisation inside; on the CPU, where
            # asking costs nothing, it stops once every problem has converged.
            for iteration in range(self.max_iterations + 1):
                # Converged: the condition below `tolerance` times its scale, the test
                # fields' norm times the data's (the residual of the zero field), or a
                # step below `tolerance (1 + |w|)`. Not relative to the first value: after
                # a coarse solve that is small already, and where basis fields are
                # dependent on a patch the steps do not shrink (they move along the
                # dependent directions, which the ridge leaves free) while the
                # condition sits at rounding.
                scale = test.norm(dim=(-1, -2)) * data[:, None]
                done = done | (f_value.norm(dim=-1) <= self.tolerance * scale)
                if iteration == self.max_iterations or (
                    local.device.type == "cpu" and bool(done.all())
                ):
                    break
                system_matrix = matrix
                if damped:
                    diagonal = torch.diagonal(matrix, dim1=-2, dim2=-1)
                    system_matrix = matrix + torch.diag_embed(damping[..., None] * diagonal)
                step, solved = self._solve(system_matrix, -f_value)
                ok = ok & (solved | done)
                trial = torch.where(done[..., None], w, w + step)
                if chord:  # the matrix kept: the condition alone at the trial
                    f_new, matrix_new, test_new, value = (
                        condition_only(trial, u, local, inputs),
                        matrix,
                        test,
                        current,
                    )
                    # A chord step that has not halved the condition gets the matrix
                    # at its point next (Newton's step): the chord's linear rate is
                    # slow where the matrix moves. On a GPU, where asking whether
                    # any problem is slow would synchronise, it is computed always.
                    slow = ~done & (f_new.norm(dim=-1) > 0.5 * f_value.norm(dim=-1))
                    if local.device.type != "cpu" or bool(slow.any()):
                        fresh = system(trial, u, local, inputs)[1]
                        matrix_new = torch.where(slow[..., None, None], fresh, matrix)
                else:
                    f_new, matrix_new, test_new, value = system(trial, u, local, inputs)
                accept = ~done
                if damped:
                    # A step that raises |R|² (beyond rounding) is refused and λ raised
                    # tenfold; an accepted one lowers λ tenfold, so that near the
                    # solution the steps are Gauss-Newton's and converge as fast.
                    accept = accept & (value <= current * (1 + 1e-13))
                    damping = torch.where(accept, damping / 10, damping * 10).clamp(0, 1e12)
                    current = torch.where(accept, value, current)
                iterations = iterations + (~done).to(torch.int64)
                w = torch.where(accept[..., None], trial, w)
                f_value = torch.where(accept[..., None], f_new, f_value)
                matrix = torch.where(accept[..., None, None], matrix_new, matrix)
                test = torch.where(accept[..., None, None], test_new, test)
                done = done | (step.norm(dim=-1) <= self.tolerance * (1 + w.norm(dim=-1)))
            ok = ok & done  # not converged within max_iterations: reported
            # the (undamped) matrix of the last iterate: once, not every iteration
            condition = self._condition(matrix)

        # Galerkin's matrix (χΦ)ᵀ J (χΦ), at the solution, is the condition's exact
        # Jacobian: the adjoint needs no second derivatives, and the condition no
        # linearisation. (Least squares' Gauss-Newton matrix is not: autograd's.)
        if chord and _needs_gradient(u, local, inputs):
            with torch.no_grad():
                matrix = system(w, u, local, inputs)[1]
        jacobian = matrix if self.condition == "galerkin" else None

        def condition_of(w, u, local, *values):
            ins = dict(zip(names, values, strict=True))
            if self.condition == "galerkin":
                with self._on(cells):
                    r = self._residual_of(field(w, u, local), ins)
                return _tested(local, rows.gather(r))
            return system(w, u, local, ins)[0]

        values = (inputs[name] for name in names)
        w = implicit_root(condition_of, w, u, local, *values, jacobian=jacobian, ridge=self.ridge)
        return w, ok, condition, iterations

    def _prepare(self, prediction, basis, inputs):
        self._check(prediction, basis)
        free = self.free.to(basis.device)
        # float64 throughout: the small systems are ill-conditioned in float32
        g = prediction[:, 0].double()
        phi = torch.where(free, basis.double(), 0.0)  # zero on Dirichlet DOFs
        return g, phi, {k: v.double() for k, v in inputs.items()}

    def _global(self, u, phi, inputs, linear=None, data=None):
        """One solve over the whole domain: ``u + Φ w`` with the condition."""
        if linear is not None and self.condition == "galerkin":
            out, ok, condition = _GalerkinSolve.apply(u, phi, *linear, self)
            return out, ok, condition, torch.ones_like(condition, dtype=torch.int64)
        sets = (self.everywhere, self.everywhere, None)
        w, ok, condition, iterations = self._experts(
            u, phi[:, None], sets, inputs, linear, data=data
        )
        return u + (w @ phi)[:, 0], ok[:, 0], condition, iterations

    def _linear_part(self, u, inputs):
        """For an affine residual, ``(R(0), J)``: all that its solves need, found once
        per call. It depends on the inputs alone, so when they are data (no gradient)
        the residual's evaluations leave nothing for the backward pass."""
        if not self.affine:
            return None
        zero = torch.zeros_like(u)
        assembled = getattr(self.residual, "jacobian_entries", None)
        entries = None if assembled is None else assembled(self.pattern, **inputs)
        if entries is None:  # recovered from one linearisation per colour
            return self._linearise(zero, inputs)
        offset = getattr(self.residual, "offset", None)
        r0 = None if offset is None else offset(**inputs)
        if r0 is None:
            r0 = self._residual_of(zero, inputs)
        r0 = r0.to(u.dtype)
        if not self._pattern_checked:  # the residual's own J, checked once like a recovered one
            self._check_pattern(zero, inputs, r0, entries)
        return r0, entries.to(u.dtype)

    def _finish(self, u, ok, conditions, iterations, dtype, inputs: dict, linear) -> torch.Tensor:
        """The output ``(B, 1, n)``, and :attr:`report` of this call, per sample:
        ``converged`` (every solve factorised and finite, every Newton iteration
        converged), ``singular`` (how many of its systems were numerically singular,
        solved through the ridge), ``condition`` (the largest condition number),
        ``iterations`` (sweeps, or for a nonlinear residual the Newton iterations of
        all its solves) and ``residual_norm`` (of the output, free DOFs)."""
        with torch.no_grad():
            r = torch.where(self.free, self._residual_from(u, linear, inputs), 0.0)
            conditions = torch.cat(conditions, dim=1) if conditions else u.new_zeros(len(u), 1)
            self.report = {
                "converged": ok.detach().cpu(),
                "singular": (~(conditions < _CONDITION_LIMIT)).sum(dim=1).cpu(),
                "condition": conditions.amax(dim=1).cpu(),
                "iterations": iterations.cpu(),
                "residual_norm": r.norm(dim=-1).cpu(),
            }
        return u.to(dtype)[:, None]


class HardConstraint(_Constraint):
    """The output ``g + Φ w`` whose residual vanishes against the basis on the whole domain.

    Args:
        residual: a module ``R(u, **inputs)`` on ``(..., n_dofs)`` tensors that knows
            its space (``residual.forms.space``), such as ``PDEFamily.residual()``;
            ``affine = True`` on it makes one linear solve exact, else Newton's
            method solves.
        condition: ``"galerkin"`` or ``"least_squares"`` (for a residual that is not
            affine, Levenberg-Marquardt iterations: a step that raises ``|R|²`` is
            refused and the damping raised tenfold, an accepted one lowers it tenfold).
        ridge: added to the unit diagonal of each scaled system.
        max_iterations, tolerance: Newton's, for residuals that are not affine: a
            solve has converged when its condition has fallen below ``tolerance``
            times its scale (the test fields' norm times that of the residual of
            the zero field), or its step below ``tolerance (1 + |w|)``.
        chord: for a residual that is not affine, with the Galerkin condition, keep
            the first iterate's matrix (chord iterations: a residual evaluation per
            iteration instead of a linearisation; the same root, and the exact
            matrix at it for the gradient). BENCHMARKS.md measures both.

    Shapes:
        ``prediction (B, 1, n)``, ``basis (B, N, n)``, each input ``(B, n)`` ->
        ``(B, 1, n)`` in the prediction's dtype.
    """

    def __init__(
        self,
        residual: nn.Module,
        *,
        condition: Condition = "galerkin",
        ridge: float = 1e-12,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
        chord: bool = True,
    ):
        super().__init__(
            residual,
            condition=condition,
            ridge=ridge,
            max_iterations=max_iterations,
            tolerance=tolerance,
            chord=chord,
        )

    def forward(self, prediction, basis, **inputs):
        g, phi, inputs = self._prepare(prediction, basis, inputs)
        linear = self._linear_part(g, inputs)
        u, ok, condition, iterations = self._global(g, phi, inputs, linear)
        return self._finish(
            u, ok, [condition], iterations.sum(dim=1), prediction.dtype, inputs, linear
        )


class MoEConstraint(_Constraint):
    """Experts on overlapping subdomains, each solving for its own basis coefficients.

    Each sweep, expert ``k`` solves the condition for ``N`` coefficients of its basis
    ``χ_k Φ`` (the basis restricted to its extended set), the field outside held at
    its current values. With ``update="colours"`` (default) the experts go colour by
    colour: no expert of a colour reads the residual where another's correction
    moves it (Galerkin: no extended set meets another's extended set or halo; least
    squares: nor halo another halo), so solving them at once is solving them one
    after the other; each corrects its whole extended set, and the next colour sees
    the new field; for a symmetric positive definite problem each step minimises
    the energy over an expert's span, so the error cannot grow (BENCHMARKS.md
    measures it). With ``update="owners"`` every expert solves from the same field
    and each DOF takes its owner's correction. With ``coarse`` a global solve comes
    first. ``K = 1`` without ``coarse`` is :class:`HardConstraint`.

    The experts' matrices need ``J (χ_k Φ)``, which differs from ``χ_k (J Φ)`` at the
    edge of the extended set: each expert multiplies by its own block
    ``J[rows_k, extended_k]`` of the recovered Jacobian, so an expert costs its own
    entries' work, and its fields are held on its own DOFs only.

    Args:
        residual: as for :class:`HardConstraint`.
        partition: a strategy (:class:`~fenop.fem.MetisPartition`,
            :class:`~fenop.fem.BisectionPartition`, ...), applied to the residual's space.
        condition: ``"galerkin"`` or ``"least_squares"`` (the expert's residual rows are
            its extended set and halo).
        overlap: graph layers around each expert's owned DOFs.
        sweeps: expert sweeps.
        coarse: a global solve first (the two-level method).
        update: ``"colours"`` or ``"owners"``.
        nonlinear: for a residual that is not affine, ``"linearised"`` (default): the
            experts' sweeps solve its linearisation at the field they start from (the
            coarse solution), one Newton step of the two-level iteration, with the
            affine residual's machinery, the gradient through the linearisation too;
            ``"newton"``: each expert solves its own nonlinear problem by Newton's
            method (chord iterations) with the implicit function theorem's gradient.
            The coarse solve is Newton's either way. Measured on one sample
            (BENCHMARKS.md, "Nonlinear experts"): the outputs agree to 1e-4 relative,
            below the errors both leave, and the linearised sweeps cost 3-9x less.
        ridge, max_iterations, tolerance, chord: as for :class:`HardConstraint`.

    Shapes:
        as for :class:`HardConstraint`.
    """

    def __init__(
        self,
        residual: nn.Module,
        partition,
        *,
        condition: Condition = "galerkin",
        overlap: int = 2,
        sweeps: int = 3,
        coarse: bool = True,
        update: Update = "colours",
        nonlinear: Nonlinear = "linearised",
        ridge: float = 1e-12,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
        chord: bool = True,
    ):
        super().__init__(
            residual,
            condition=condition,
            ridge=ridge,
            max_iterations=max_iterations,
            tolerance=tolerance,
            chord=chord,
        )
        if update not in UPDATES:
            raise ValueError(f"`update` must be one of {UPDATES}, got {update!r}")
        if nonlinear not in NONLINEAR:
            raise ValueError(f"`nonlinear` must be one of {NONLINEAR}, got {nonlinear!r}")
        self.nonlinear = nonlinear
        # the sweeps solve an affine residual: the residual itself, or its linearisation
        self.linear_sweeps = self.affine or nonlinear == "linearised"
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ValueError(f"`sweeps` must be a non-negative int, got {sweeps!r}")
        self.update = update
        # Colour by colour, the sweeps of an affine residual keep R(u) up to date from
        # the experts' own products (_tracked_sweeps) rather than evaluating it.
        self.tracked = self.linear_sweeps and update == "colours"
        self.strategy, self.overlap, self.sweeps, self.coarse = partition, overlap, sweeps, coarse
        self.partition = p = partition.partition(self.space, overlap=overlap)
        # An expert's rows: least squares' residual rows, or where R moves when the
        # sweeps track it, are its extended set and halo (J reaches one layer out).
        self.halo_rows = condition == "least_squares" or self.tracked
        self.rows = p.extended | p.halo if self.halo_rows else p.extended
        # where an expert's condition reads R, and where its correction moves it
        reads = p.extended | p.halo if condition == "least_squares" else p.extended
        self.colours = _colours(reads, p.extended | p.halo)
        self._build(rank=0, world=1)

    def shard(self, rank: int, world: int) -> None:
        """Solve only process ``rank``'s share of each colour's experts (of ``world``
        processes in the default ``torch.distributed`` group, which must be
        initialised before the first call), every process taking the whole batch:
        the corrections are summed over the processes, gradients flow back through
        the sum (:mod:`fenop.operators.sharding`), and each process holds only its
        experts' index sets and blocks. The outputs and gradients are those of one
        process (to rounding). ``shard(0, 1)`` undoes it."""
        if not 0 <= rank < world:
            raise ValueError(f"`rank` must be in [0, world), got rank {rank} of {world}")
        self._build(rank=rank, world=world)

    def _build(self, *, rank: int, world: int) -> None:
        """Per colour, this process's experts (``colour[rank::world]``), padded to one
        count on every process by copies that solve nothing (their fields are all
        padding), so that every process runs the same steps."""
        p, n, device = self.partition, self.space.n_dofs, self.free.device
        self.world = world
        # per colour: the experts' extended sets, their rows, and J's blocks on them
        self.groups = nn.ModuleList()
        self.owned = nn.ModuleList()  # per colour: which of an expert's DOFs it owns
        self.places = nn.ModuleList()  # per colour (tracked Galerkin): extended sets in rows
        # Experts solving a residual that is not affine linearise it at every Newton
        # iteration: each colour's experts then evaluate it on the cells that touch
        # their rows alone, where their rows and their blocks of J are exact.
        self.cells = nn.ModuleList()
        for colour in self.colours:
            mine = colour[rank::world]
            count = -(-len(colour) // world)
            real = np.arange(count) < len(mine)
            experts = np.r_[mine, np.full(count - len(mine), colour[0])]
            cols = [np.flatnonzero(p.extended[k]) for k in experts]
            rows_of = [np.flatnonzero(self.rows[k]) for k in experts]
            extended = _IndexSets(cols, n, keep=real)
            row_sets = extended
            if self.halo_rows:
                row_sets = _IndexSets(rows_of, n, keep=real)
            blocks = self.pattern.blocks(rows_of, cols)
            self.groups.append(nn.ModuleList([extended, row_sets, blocks]))
            labels = p.labels[extended.index.numpy()] == experts[:, None]
            self.owned.append(_Constant(torch.from_numpy(labels) & extended.valid))
            if self.tracked and self.condition == "galerkin":
                # where each DOF of an expert's extended set is among its rows
                place = [np.searchsorted(r, c) for r, c in zip(rows_of, cols, strict=True)]
                self.places.append(_Constant(_IndexSets(place, n).index))
            if not self.linear_sweeps:
                touched = self.rows[experts].any(axis=0)
                element_dofs = self.space.basis.element_dofs
                subset = np.flatnonzero(touched[element_dofs].any(axis=0))
                self.cells.append(self.residual.forms.subset(subset))
        for modules in (self.groups, self.owned, self.places, self.cells):
            modules.to(device)

    def forward(self, prediction, basis, **inputs):
        g, phi, inputs = self._prepare(prediction, basis, inputs)
        batch = phi.shape[0]
        ok = torch.ones(batch, dtype=torch.bool, device=phi.device)
        iterations = torch.zeros(batch, dtype=torch.int64, device=phi.device)
        linear = self._linear_part(g, inputs)
        # Newton's scale, the same for every solve: where one runs (a residual that is
        # not affine, in the coarse solve or the experts' own)
        newton = not self.affine and (self.coarse or not self.linear_sweeps)
        data = self._data_norm(g, inputs) if newton else None
        u, conditions = g, []
        if self.coarse:
            u, ok, condition, steps = self._global(u, phi, inputs, linear, data)
            conditions.append(condition)
            iterations = iterations + steps.sum(dim=1)
        # The sweeps' affine residual: a residual's own (R(0), J), or, for one that is
        # not affine, its linearisation at the sweeps' starting field, R(u) - J u and J.
        sweep_linear, r_start = linear, None
        if self.linear_sweeps and not self.affine:
            r_start, values = self._linearise(u, inputs)
            sweep_linear = (r_start - self.pattern.matmul(values, u[:, None])[:, 0], values)
        # Sharded over processes (shard()): what every process holds enters its share
        # of the experts through to_shards, and their corrections leave through
        # from_shards; with one process both are the identity.
        sharded = self.world > 1
        if sharded and not sharding.active():
            raise RuntimeError(
                f"this MoEConstraint is sharded over {self.world} processes, but no "
                "torch.distributed process group of that size is initialised"
            )
        share_inputs = {k: sharding.to_shards(v) for k, v in inputs.items()}
        share_linear = (
            None if sweep_linear is None else tuple(map(sharding.to_shards, sweep_linear))
        )
        share_phi = sharding.to_shards(phi)
        if self.tracked:
            # a linearisation's own R(u) where there is one
            r = self._residual_from(u, sweep_linear, inputs) if r_start is None else r_start
            u, expert_ok, expert_iterations, expert_conditions = self._tracked_sweeps(
                u, r, share_phi, share_linear[1]
            )
        else:
            u, expert_ok, expert_iterations, expert_conditions = self._solved_sweeps(
                u, share_phi, share_inputs, share_linear, data
            )
        if sharded:  # the report covers every process's experts
            expert_ok, expert_iterations, expert_conditions = _gathered_report(
                expert_ok, expert_iterations, expert_conditions
            )
        ok = ok & expert_ok
        iterations = iterations + expert_iterations
        conditions = conditions + expert_conditions
        return self._finish(u, ok, conditions, iterations, prediction.dtype, inputs, linear)

    def _tracked_sweeps(self, u, r, phi, values, *, written_out=None):
        """The sweeps colour by colour for an affine residual (or a linearisation) of
        Jacobian entries ``values`` ``(B, nnz)``, from ``u`` and ``r = R(u)`` ``(B, n)``,
        with the basis ``phi`` ``(B, N, n)``. No sweep evaluates the residual or
        multiplies by the whole ``J``: an expert's correction ``Σ_j w_j χ_k Φ_j``
        changes ``R`` by ``Σ_j w_j J (χ_k Φ_j)`` on its rows (its extended set and
        halo), the products its matrix is made of (BENCHMARKS.md, "Affine
        residuals"); and as only ``R`` steers the solves, ``u`` takes each expert's
        corrections, summed over the sweeps, once at the end. What does not depend
        on the field (the matrices, their factors and condition numbers) is formed
        once per colour, before the sweeps.

        On one process (or ``written_out``) the sweeps' backward pass is written out
        (:class:`_TrackedSweeps`); sharded, autograd goes through them and the sums
        over the processes.

        Returns ``u`` ``(B, n)``, whether every solve succeeded ``(B,)``, the number of
        expert solves ``(B,)`` and their condition numbers (``(B, k)`` per solve)."""
        ok = torch.ones(len(u), dtype=torch.bool, device=u.device)
        solves = torch.zeros(len(u), dtype=torch.int64, device=u.device)
        conditions, colours = [], []
        if not self.sweeps:
            return u, ok, solves, conditions
        places = self.places if len(self.places) else [None] * len(self.groups)
        # χ_k Φ on each colour's extended sets, (B, k, N, m)
        locals_ = _IndexSets.gather_all([extended for extended, _, _ in self.groups], phi)
        # J (χ_k Φ) on the rows, (B, k, N, m_r)
        applieds = [
            blocks.matmul(values, local)
            for (_, _, blocks), local in zip(self.groups, locals_, strict=True)
        ]
        if self.world == 1 if written_out is None else written_out:
            u, ok, condition = _TrackedSweeps.apply(self, u, r, *locals_, *applieds)
            solves = solves + self.sweeps * sum(len(colour) for colour in self.colours)
            return u, ok, solves, [condition] * self.sweeps
        for (extended, rows, _), place, local, applied in zip(
            self.groups, places, locals_, applieds, strict=True
        ):
            test, on, matrix, _ = self._colour_system(local, applied, extended, rows, place)
            factors, condition = self._factorise(matrix), self._condition(matrix)
            colours.append((rows, (test, on), applied, factors, condition))
            real = extended.valid.any(dim=-1)  # not the padding of a process's share
            solves = solves + self.sweeps * real.sum()
        totals = [0.0] * len(colours)  # each colour's coefficients, summed over the sweeps
        for sweep in range(self.sweeps):
            for c, (rows, (test, on), applied, factors, condition) in enumerate(colours):
                f_value = _tested(test, on.gather(sharding.to_shards(r)))
                w, solved = self._solve_factored(factors, -f_value)
                totals[c] = totals[c] + w
                if sweep < self.sweeps - 1 or c < len(colours) - 1:  # R is read again
                    r = r + sharding.from_shards(rows.scatter(_combined(w, applied)))
                ok = ok & solved.all(dim=1)
                conditions.append(condition)
        change = sum(
            extended.scatter(_combined(total, local))
            for (extended, _, _), local, total in zip(self.groups, locals_, totals, strict=True)
        )
        return u + sharding.from_shards(change), ok, solves, conditions

    def _colour_system(self, local, applied, extended, rows, place):
        """A colour's test fields, the index sets they are tested on and its matrix,
        from the experts' bases ``local`` ``(B, k, N, m)`` and ``applied = J (χ_k Φ)``
        on their rows ``(B, k, N, m_r)``; for Galerkin also where the extended sets
        sit in the rows (``place``, expanded) and ``J (χ_k Φ)`` there, else ``None``."""
        if self.condition == "galerkin":
            # the test fields χ_k Φ live on the extended sets (the rows' halo is only
            # where R moves): J (χ_k Φ) there, taken from the rows (padding: garbage
            # that meets the test fields' zeros)
            index = place.value[:, None].expand(*local.shape[:-1], -1)
            on_extended = applied.gather(-1, index)
            matrix = local @ on_extended.transpose(-1, -2)
            return local, extended, matrix, (index, on_extended)
        return applied, rows, applied @ applied.transpose(-1, -2), None

    def _solved_sweeps(self, u, phi, inputs, linear, data):
        """The sweeps that evaluate the residual: the experts' own Newton solves, or
        (``update="owners"``) every expert solving from the sweep's starting field
        ``u`` ``(B, n)``, each DOF taking its owner's correction. Returns as
        :meth:`_tracked_sweeps`, the solves counted by their Newton iterations."""
        ok = torch.ones(len(u), dtype=torch.bool, device=u.device)
        iterations = torch.zeros(len(u), dtype=torch.int64, device=u.device)
        conditions = []
        # χ_k Φ on each expert's extended set, (B, k, N, m) per colour
        locals_ = _IndexSets.gather_all([extended for extended, _, _ in self.groups], phi)
        caches = [{} for _ in self.groups]  # an affine residual's matrices, per colour
        cells = self.cells if len(self.cells) else [None] * len(self.groups)
        for _ in range(self.sweeps):
            start, corrections = u, []
            for sets, local, owned, cache, subset in zip(
                self.groups, locals_, self.owned, caches, cells, strict=True
            ):
                # colours: from the field the previous colours made; owners: all from
                # the sweep's starting field
                base = sharding.to_shards(u if self.update == "colours" else start)
                w, solved, condition, steps = self._experts(
                    base, local, tuple(sets), inputs, linear, cache, subset, data=data
                )
                ok = ok & solved.all(dim=1)
                conditions.append(condition)
                real = sets[0].valid.any(dim=-1)  # not the padding of a process's share
                iterations = iterations + (steps * real).sum(dim=1)
                change = _combined(w, local)  # (B, k, m)
                if self.update == "colours":
                    u = u + sharding.from_shards(sets[0].scatter(change))
                else:  # each DOF takes its owner's correction, at the end of the sweep
                    corrections.append(sharding.from_shards(sets[0].scatter(change * owned.value)))
            if self.update == "owners":
                u = start + sum(corrections)
        return u, ok, iterations, conditions


class _GalerkinSolve(torch.autograd.Function):
    """The global Galerkin solve of an affine residual ``R(u) = J u + R(0)``:
    ``out = g + Φᵀ w`` with ``(Φ J Φᵀ) w = -Φ R(g)``, from ``g`` ``(B, n)``, ``Φ``
    ``(B, N, n)``, ``R(0)`` ``(B, n)``, ``J``'s entries ``(B, nnz)`` and the layer
    (its pattern and solves); also whether each solve succeeded ``(B,)`` and the
    condition numbers ``(B, 1)``.

    The backward pass is written out. With ``λ = -M⁻ᵀ Φ ḡ`` (``M = Φ J Φᵀ``),
    ``z = Φᵀ λ`` and ``a = ḡ + Jᵀ z``, the gradients are ``ḡ_g = a``, ``ḡ_R(0) = z``,
    ``ḡ_J = z outᵀ`` on the pattern and ``ḡ_Φ = w aᵀ + λ R(out)ᵀ``: one rank-2
    product and two sparse products with one field each, where autograd through
    the forward pass forms four ``(B, N, n)`` outer products and sums them, and
    multiplies ``Jᵀ`` by ``N`` fields. The scaling and ridge of the solve
    (:meth:`_Constraint._scaled`) are taken as constants: their part of the
    gradient is of the ridge's size. ``M̄ = λ wᵀ`` is not made symmetric, which
    changes nothing along perturbations that keep a symmetric system symmetric.
    Once differentiable."""

    @staticmethod
    def forward(ctx, g, phi, r0, values, layer):
        pattern = layer.pattern
        applied = pattern.matmul(values, phi)  # J φ_j, (B, N, n)
        r = layer._residual_from(g, (r0, values), {})
        matrix = phi @ applied.transpose(-1, -2)
        factors, condition = layer._factorise(matrix), layer._condition(matrix)
        w, ok = layer._solve_factored(factors, -(phi @ r[..., None])[..., 0])
        out = g + (w[:, None] @ phi)[:, 0]
        ctx.layer, ctx.factors = layer, factors
        ctx.save_for_backward(phi, r0, values, w, out)
        condition = condition[:, None]
        ctx.mark_non_differentiable(ok, condition)
        return out, ok, condition

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ok, _condition):
        phi, r0, values, w, out = ctx.saved_tensors
        layer, pattern = ctx.layer, ctx.layer.pattern
        lam = -layer._solve_factored(ctx.factors, (phi @ grad[..., None])[..., 0], adjoint=True)[0]
        z = (lam[:, None] @ phi)[:, 0]
        a = grad + pattern.matmul(values, z[:, None], transpose=True)[:, 0]
        grad_phi = grad_values = None
        if ctx.needs_input_grad[1]:
            r_out = layer._residual_from(out, (r0, values), {})
            grad_phi = torch.stack([w, lam], dim=-1) @ torch.stack([a, r_out], dim=1)
        if ctx.needs_input_grad[3]:
            grad_values = pattern.outer(z, out)
        return a, grad_phi, z, grad_values, None


class _TrackedSweeps(torch.autograd.Function):
    """The sweeps of :meth:`MoEConstraint._tracked_sweeps` on one process, from the
    layer, ``u`` and ``r = R(u)`` ``(B, n)``, and per colour the experts' bases
    ``χ_k Φ`` ``(B, k, N, m)`` and then their products ``J (χ_k Φ)`` on the rows
    ``(B, k, N, m_r)``. Returns ``u`` after the sweeps ``(B, n)``, whether every
    solve succeeded ``(B,)`` and the experts' condition numbers ``(B, K)``.

    The backward pass is written out. Going back through the solves (colour ``c``
    of sweep ``s``: ``w = -M⁻¹ T r_on``, then ``r += scatter(Aᵀ w)``), with ``r̄`` the
    running gradient of ``r``: ``w̄ = χ_k Φ ū + A r̄_rows``, ``λ = -M⁻ᵀ w̄``,
    ``r̄ += scatter(Tᵀ λ)``. The basis-sized gradients are sums over the sweeps of
    outer products, ``Σ_s λ_s r_onᵀ`` and ``Σ_s w_s r̄_rowsᵀ``, formed as one product
    per colour over the sweeps stacked, where autograd forms two per solve and adds
    them up; ``M̄ = Σ_s λ_s w_sᵀ`` then goes to ``M``'s factors. As for
    :class:`_GalerkinSolve`, the scaling and ridge are taken as constants, and
    ``M̄`` is not made symmetric: the gradients are autograd's for every
    perturbation that keeps a symmetric system symmetric (tested). Once
    differentiable."""

    @staticmethod
    def forward(ctx, layer, u, r, *fields):
        colours = len(layer.groups)
        locals_, applieds = fields[:colours], fields[colours:]
        places = layer.places if layer.condition == "galerkin" else [None] * colours
        ok = torch.ones(len(u), dtype=torch.bool, device=u.device)
        systems, conditions = [], []
        for (extended, rows, _), place, local, applied in zip(
            layer.groups, places, locals_, applieds, strict=True
        ):
            test, on, matrix, placed = layer._colour_system(local, applied, extended, rows, place)
            systems.append((test, on, placed, layer._factorise(matrix)))
            conditions.append(layer._condition(matrix))
        totals = [0.0] * colours
        steps = []  # per solve: its colour, R where it read it, its coefficients, whether R moved
        for sweep in range(layer.sweeps):
            for c, (test, on, _, factors) in enumerate(systems):
                r_on = on.gather(r)
                w, solved = layer._solve_factored(factors, -(test @ r_on[..., None])[..., 0])
                totals[c] = totals[c] + w
                moved = sweep < layer.sweeps - 1 or c < colours - 1  # R is read again
                if moved:
                    r = r + layer.groups[c][1].scatter((w[..., None, :] @ applieds[c])[..., 0, :])
                ok = ok & solved.all(dim=1)
                steps.append((c, r_on, w, moved))
        change = sum(
            extended.scatter((total[..., None, :] @ local)[..., 0, :])
            for (extended, _, _), local, total in zip(layer.groups, locals_, totals, strict=True)
        )
        ctx.layer, ctx.systems, ctx.steps, ctx.totals = layer, systems, steps, totals
        ctx.save_for_backward(*locals_, *applieds)
        condition = torch.cat(conditions, dim=1)
        ctx.mark_non_differentiable(ok, condition)
        return u + change, ok, condition

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ok, _condition):
        layer, systems = ctx.layer, ctx.systems
        colours = len(systems)
        locals_, applieds = ctx.saved_tensors[:colours], ctx.saved_tensors[colours:]
        extendeds = [extended for extended, _, _ in layer.groups]
        grad_on = [e.gather(grad) for e in extendeds]  # ū on each extended set, (B, k, m)
        # the gradient of each colour's coefficients summed over the sweeps
        grad_totals = [
            (loc @ g[..., None])[..., 0] for loc, g in zip(locals_, grad_on, strict=True)
        ]
        grad_r = torch.zeros_like(grad)
        lams, r_ons = [[] for _ in systems], [[] for _ in systems]
        moved_ws, grad_rows = [[] for _ in systems], [[] for _ in systems]
        grad_matrix = [0.0] * colours
        for c, r_on, w, moved in reversed(ctx.steps):
            test, on, _, factors = systems[c]
            grad_w = grad_totals[c]
            if moved:
                g_rows = layer.groups[c][1].gather(grad_r)
                grad_w = grad_w + (applieds[c] @ g_rows[..., None])[..., 0]
                moved_ws[c].append(w)
                grad_rows[c].append(g_rows)
            lam = -layer._solve_factored(factors, grad_w, adjoint=True)[0]
            grad_r = grad_r + on.scatter((lam[..., None, :] @ test)[..., 0, :])
            lams[c].append(lam)
            r_ons[c].append(r_on)
            grad_matrix[c] = grad_matrix[c] + lam[..., :, None] * w[..., None, :]
        grad_locals, grad_applieds = [], []
        for c, (test, _, placed, _) in enumerate(systems):
            # Σ_s λ_s r_onᵀ (the test fields'), one product over the sweeps stacked
            grad_test = torch.stack(lams[c], dim=-1) @ torch.stack(r_ons[c], dim=-2)
            grad_local = ctx.totals[c][..., :, None] * grad_on[c][..., None, :]
            if moved_ws[c]:
                grad_applied = torch.stack(moved_ws[c], dim=-1) @ torch.stack(grad_rows[c], dim=-2)
            else:  # one sweep, the last colour: R did not move
                grad_applied = torch.zeros_like(applieds[c])
            m_bar = grad_matrix[c]
            if placed is not None:  # Galerkin: M = (χ_k Φ) (J χ_k Φ on the extended set)ᵀ
                index, on_extended = placed
                grad_local = grad_local + grad_test + m_bar @ on_extended
                grad_applied = grad_applied.scatter_add(
                    -1, index, m_bar.transpose(-1, -2) @ locals_[c]
                )
            else:  # least squares: M = A Aᵀ, the test fields A
                grad_applied = grad_applied + grad_test + (m_bar + m_bar.transpose(-1, -2)) @ test
            grad_locals.append(grad_local)
            grad_applieds.append(grad_applied)
        return None, grad, grad_r, *grad_locals, *grad_applieds


def _gathered_report(ok, iterations, conditions):
    """The experts' success ``(B,)``, iterations ``(B,)`` and condition numbers (a
    list of ``(B, k)``) of every process of the default group, on every process."""
    with torch.no_grad():
        ok = ok.to(torch.int64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        iterations = iterations.clone()
        dist.all_reduce(iterations)
        gathered = []
        for condition in conditions:
            parts = [torch.empty_like(condition) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, condition.contiguous())
            gathered.append(torch.cat(parts, dim=1))
    return ok.bool(), iterations, gathered


def _combined(w: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_j fields_j``: ``(B, k, N)``, ``(B, k, N, m)`` -> ``(B, k, m)``."""
    return _Contraction.apply(w, fields, False)


def _tested(test: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``test_j · r`` for each field: ``(B, k, N, m)``, ``(B, k, m)`` -> ``(B, k, N)``."""
    return _Contraction.apply(r, test, True)


class _Contraction(torch.autograd.Function):
    """``fields`` ``(..., N, m)`` contracted with a vector ``x``: along ``N`` (``x``
    ``(..., N)``, giving ``(..., m)``) or, ``tested``, along ``m`` (``x`` ``(..., m)``,
    giving ``(..., N)``). Both ways a batched matrix product, 2-3x faster than an
    elementwise product and a sum on the CPU; but the gradient with respect to
    ``fields`` is an outer product, which a batched product forms 2.5x slower than
    an elementwise one (measured at 5e4 DOFs), so the backward is written out."""

    @staticmethod
    def forward(x, fields, tested):
        if tested:
            return (fields @ x[..., None])[..., 0]
        return (x[..., None, :] @ fields)[..., 0, :]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fields, ctx.tested = inputs
        ctx.save_for_backward(x, fields)
        ctx.inputs = (x, fields)  # for forward mode

    @staticmethod
    def backward(ctx, grad):
        x, fields = ctx.saved_tensors
        grad_x = grad_fields = None
        if ctx.tested:  # out_j = fields_j · x
            if ctx.needs_input_grad[0]:
                grad_x = _Contraction.apply(grad, fields, False)
            if ctx.needs_input_grad[1]:
                grad_fields = grad[..., :, None] * x[..., None, :]
        else:  # out = Σ_j x_j fields_j
            if ctx.needs_input_grad[0]:
                grad_x = _Contraction.apply(grad, fields, True)
            if ctx.needs_input_grad[1]:
                grad_fields = x[..., :, None] * grad[..., None, :]
        return grad_x, grad_fields, None

    @staticmethod
    def jvp(ctx, x_tangent, fields_tangent, _):
        x, fields = ctx.inputs
        out = 0.0
        if x_tangent is not None:
            out = out + _Contraction.apply(x_tangent, fields, ctx.tested)
        if fields_tangent is not None:
            out = out + _Contraction.apply(x, fields_tangent, ctx.tested)
        return out


def _jvp(fn, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``J_fn(primal) tangent`` by forward mode (``torch.autograd.forward_ad``),
    ``primal`` broadcast against ``tangent``; differentiable by reverse mode (the
    layer's gradients go through it)."""
    with forward_ad.dual_level():
        # forward mode writes into its dual tensors: no expanded (aliased) ones
        dual = forward_ad.make_dual(primal.expand_as(tangent).contiguous(), tangent.contiguous())
        return forward_ad.unpack_dual(fn(dual)).tangent


class _IndexSets(nn.Module):
    """The DOF sets of ``k`` experts, padded to one length ``m``, and the moves between
    global fields and the experts' own: ``(B, ..., n) -> (B, k, ..., m)`` and back.
    ``sets=None`` is one set of every DOF (the global solve), moved without copies;
    ``keep`` ``(k,)`` bool, where given, makes the sets it marks False all padding.

    Attributes:
        index: ``(k, m)`` DOF indices (padding points at DOF 0).
        valid: ``(k, m)`` bool, False on padding.
    """

    def __init__(self, sets: list[np.ndarray] | None, n_dofs: int, *, keep=None):
        super().__init__()
        self.n_dofs, self.everything = n_dofs, sets is None
        if self.everything:
            return
        m = max(len(s) for s in sets)
        index = np.zeros((len(sets), m), dtype=np.int64)
        valid = np.zeros((len(sets), m), dtype=bool)
        for k, dofs in enumerate(sets):
            index[k, : len(dofs)], valid[k, : len(dofs)] = dofs, True
        if keep is not None:  # sets not kept are all padding
            valid &= np.asarray(keep, dtype=bool)[:, None]
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        self.register_buffer("valid", torch.from_numpy(valid), persistent=False)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ..., n)`` -> ``(B, k, ..., m)``, zero on padding."""
        if self.everything:
            return x[:, None]
        return _IndexSets.gather_all([self], x)[0]

    @staticmethod
    def gather_all(sets: list[_IndexSets], x: torch.Tensor) -> list[torch.Tensor]:
        """``[s.gather(x) for s in sets]`` in one indexing of ``x``, whose backward
        fills one zero array of ``x``'s size, not one per set. At 5e4 DOFs such an
        array of a basis is tens of MB, memory new to the process each time, whose
        page faults cost more than the zeroing (the profiler's largest item in the
        experts' backward pass)."""
        if any(s.everything for s in sets):
            return [s.gather(x) for s in sets]
        picked = x.index_select(-1, torch.cat([s.index.reshape(-1) for s in sets]))
        parts = picked.split([s.index.numel() for s in sets], dim=-1)
        # contiguous: the batched products that use the experts' fields would copy
        # a strided view each time (measured: a slower backward pass)
        return [
            (part.unflatten(-1, s.index.shape) * s.valid).movedim(-2, 1).contiguous()
            for part, s in zip(parts, sets, strict=True)
        ]

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, k, ..., m)`` -> ``(B, ..., n)``, the sum of the experts' values at each
        DOF (padding ignored)."""
        if self.everything:
            return y[:, 0]
        shape = (len(self.index),) + (1,) * (y.ndim - 3) + (self.index.shape[1],)
        flat = (y * self.valid.reshape(shape)).movedim(1, -2).flatten(-2)  # (B, ..., k m)
        out = y.new_zeros(*flat.shape[:-1], self.n_dofs)
        return out.index_add_(-1, self.index.reshape(-1), flat)


class _Constant(nn.Module):
    """A constant tensor that moves with its module (a buffer in a ModuleList)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value, persistent=False)


def _colours(reads: np.ndarray, writes: np.ndarray) -> list[np.ndarray]:
    """Experts in groups that can solve at once: no expert of a group reads (the rows
    of its condition, ``reads`` ``(K, n)`` bool) where another writes (where its
    correction moves the residual, ``writes`` ``(K, n)``). Then solving a group's
    experts together is solving them one after the other. A DSATUR colouring of the
    graph of such conflicts (next, the expert whose neighbours already use the most
    colours; ties to the most neighbours, then the lowest index): at 33 x 33 P1 DOFs
    and K = 64 (overlap 2, Galerkin) it needs 9 colours where a greedy colouring of
    overlapping extended sets and halos needs 12. Returns the expert indices of
    each colour."""
    k = reads.shape[0]
    read = scipy.sparse.csr_array(reads.astype(np.float64))
    write = scipy.sparse.csr_array(writes.astype(np.float64))
    meets = scipy.sparse.csr_array(read @ write.T)
    conflicts = scipy.sparse.csr_array(meets + meets.T)
    conflicts.setdiag(0)
    conflicts.eliminate_zeros()
    neighbours = np.split(conflicts.indices, conflicts.indptr[1:-1])
    degree = np.array([len(n) for n in neighbours])
    colour = np.full(k, -1)
    seen = [set() for _ in range(k)]  # the colours among each expert's neighbours
    for _ in range(k):
        free = np.flatnonzero(colour < 0)
        saturation = np.array([len(seen[e]) for e in free])
        best = free[np.lexsort((free, -degree[free], -saturation))[0]]
        colour[best] = next(c for c in range(k) if c not in seen[best])
        for other in neighbours[best]:
            seen[other].add(colour[best])
    return [np.flatnonzero(colour == c) for c in range(colour.max() + 1)]
