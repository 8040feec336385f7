"""The machinery both constraint layers share: the residual, its linearisation on
the FE pattern, the scaled and ridged dense solves, Newton's method with the
implicit function theorem's gradient, and the global solve."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from fenop.fem.jacobian import JacobianPattern
from fenop.operators.constraints.common import (
    _CONDITION_LIMIT,
    _DAMPING,
    CONDITIONS,
    Condition,
    _needs_gradient,
    free_dofs,
)
from fenop.operators.constraints.factorisation import Factorisation, condition_number
from fenop.operators.constraints.fields import _combined, _IndexSets, _jvp, _tested
from fenop.operators.constraints.galerkin import _GalerkinSolve
from fenop.operators.constraints.residual import AssembledJacobian, missing_members
from fenop.operators.implicit import implicit_root, scaled_system


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
        if missing := missing_members(residual):
            raise TypeError(
                f"`residual` lacks {', '.join(missing)}: a constraint's residual has the "
                "members of fenop.operators.constraints.Residual (DirichletResidual has them)"
            )
        self.residual, self.condition, self.ridge = residual, condition, float(ridge)
        self.affine = bool(residual.affine)
        # a residual that assembles its own Jacobian, in one pass
        self.assembled = isinstance(residual, AssembledJacobian)
        self.max_iterations, self.tolerance = int(max_iterations), float(tolerance)
        self.chord = bool(chord)
        self.space = residual.forms.space
        # Galerkin matrices Φᵀ J Φ are symmetric when J is on the free DOFs; the
        # (Gauss-Newton) normal equations of least squares always are.
        self.symmetric = condition == "least_squares" or bool(residual.symmetric)
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
        r0, values = linear
        return self.pattern.matmul(values, u[:, None])[:, 0] + r0

    def _factorise(self, matrix: torch.Tensor) -> Factorisation:
        """``matrix`` ``(..., N, N)`` scaled, ridged and factorised as this layer's
        systems are (its ridge; Cholesky where they are symmetric)."""
        return Factorisation(matrix, ridge=self.ridge, symmetric=self.symmetric)

    def _condition(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(...)``: the condition numbers of the scaled systems of ``matrix``
        ``(..., N, N)``, without factorising them."""
        scaled = scaled_system(matrix.detach(), self.ridge)[0]
        return condition_number(scaled, symmetric=self.symmetric)

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
                factors = self._factorise(matrix)
                condition = factors.condition()
                if cache is not None:
                    cache.update(test=test, factors=factors, condition=condition)
            w, ok = factors.solve(-f_value)
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
                step, solved = self._factorise(system_matrix).solve(-f_value)
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
