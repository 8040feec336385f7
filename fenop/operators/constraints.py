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

For a residual that is not affine in ``u`` (nonlinear diffusion) each solve is
Newton's method on the ``N`` unknowns (Gauss-Newton for least squares), with a
fixed iteration cap, per-problem convergence masks and no host synchronisation in
the loop; its backward pass is the implicit function theorem's with the exact
Jacobian (:mod:`fenop.operators.implicit`), in memory that does not grow with the
iterations.

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

import math
import warnings

import numpy as np
import torch
from torch import nn

from fenop.operators.implicit import implicit_root

CONDITIONS = ("galerkin", "least_squares")
UPDATES = ("colours", "owners")
# Solves whose scaled matrix is worse conditioned than this are reported as failed.
_CONDITION_LIMIT = 1e10


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
        condition: str,
        ridge: float,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
    ):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"`condition` must be one of {CONDITIONS}, got {condition!r}")
        if not ridge >= 0:
            raise ValueError(f"`ridge` must be non-negative, got {ridge}")
        if max_iterations < 1 or not tolerance > 0:
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
        self.space = forms.space
        # Galerkin matrices Φᵀ J Φ are symmetric when J is on the free DOFs; the
        # (Gauss-Newton) normal equations of least squares always are.
        self.symmetric = condition == "least_squares" or bool(getattr(residual, "symmetric", False))
        self.register_buffer("free", free_dofs(residual), persistent=False)
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

    def _linearised(self, u: torch.Tensor, tangents: torch.Tensor, inputs: dict):
        """``R(u)`` ``(B, n)`` and ``J(u) t`` for each tangent ``t`` of ``(B, N, n)``."""
        r = self._residual_of(u, inputs)
        if self.affine:  # exact for an affine R, and cheaper than forward mode
            return r, self._residual_of(u[:, None] + tangents, inputs) - r[:, None]
        primal = u[:, None].repeat(1, tangents.shape[1], 1)
        with warnings.catch_warnings():
            # torch loads its forward-mode decompositions through torch.jit.script on
            # first use, which torch itself deprecates: nothing of fenop's.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
            _, product = torch.func.jvp(
                lambda v: self._residual_of(v, inputs), (primal,), (tangents,)
            )
        return r, product

    def _solve(self, matrix: torch.Tensor, rhs: torch.Tensor):
        """Solve ``matrix w = rhs`` for ``(..., N, N)`` and ``(..., N)``: scaled to a
        unit diagonal, ridged. Returns ``w``, whether each solve succeeded (factorised,
        finite), and each scaled matrix's condition number: above ``1e10`` the system
        is numerically singular (basis fields dependent where it lives), and the ridge
        picks its coefficients."""
        diagonal = torch.diagonal(matrix, dim1=-2, dim2=-1).abs()
        largest = diagonal.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)
        # A basis field that vanishes where this system lives gets a zero coefficient.
        live = diagonal > 1e-14 * largest
        scale = torch.where(live, diagonal.clamp_min(1e-300).rsqrt(), torch.zeros_like(diagonal))
        scaled = scale[..., :, None] * matrix * scale[..., None, :]
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        scaled = scaled + self.ridge * eye + torch.diag_embed((~live).to(matrix.dtype))
        if self.symmetric:
            factor, info = torch.linalg.cholesky_ex(scaled)
            ok = info == 0
            safe = torch.where(ok[..., None, None], factor, eye)  # no NaN from failed ones
            y = torch.cholesky_solve((scale * rhs)[..., None], safe)[..., 0]
        else:
            lu, pivots, info = torch.linalg.lu_factor_ex(scaled)
            ok = info == 0
            y = torch.linalg.lu_solve(lu, pivots, (scale * rhs)[..., None])[..., 0]
        w = scale * y
        with torch.no_grad():
            finite = torch.isfinite(scaled).all(dim=(-1, -2))
            condition = torch.full_like(diagonal[..., 0], math.inf)
            condition[finite] = torch.linalg.cond(scaled[finite])
            ok = ok & finite & torch.isfinite(w).all(dim=-1)
        return w, ok, condition

    def _system(self, u, local, rows, inputs):
        """The experts' condition at ``u`` and its (Gauss-Newton, for least squares)
        matrix: ``F (B, k, N)``, ``M (B, k, N, N)``, for experts of bases ``local``
        ``(B, k, N, n)`` whose territories do not meet (one residual linearisation
        then serves them all), ``rows`` ``(k, n)`` the residual rows of each. Also the
        test fields ``(B, k, N, n)``: ``χ_k Φ`` (Galerkin) or ``J(χ_k Φ)`` on the rows."""
        r, product = self._linearised(u, local.sum(dim=1), inputs)
        applied = product[:, None] * rows[None, :, None]  # J(χ_k Φ) on expert k's rows
        test = local if self.condition == "galerkin" else applied
        f_value = (test @ r[:, None, :, None])[..., 0]
        matrix = test @ applied.transpose(-1, -2)
        return f_value, matrix, test

    def _experts(self, u, local, rows, inputs, cache=None):
        """Coefficients ``(B, k, N)`` of experts (territories that do not meet) solved
        from ``u`` ``(B, n)``: one solve for an affine residual (its matrix, which does
        not depend on ``u``, kept in ``cache``), Newton's method otherwise, with the
        implicit function theorem's gradient. Also whether each succeeded, the
        condition numbers and the iterations."""
        if self.affine:
            if cache is not None and "matrix" in cache:
                # J does not depend on u: only the condition's residual is new
                r = self._residual_of(u, inputs)
                f_value = (cache["test"] @ r[:, None, :, None])[..., 0]
                matrix = cache["matrix"]
            else:
                f_value, matrix, test = self._system(u, local, rows, inputs)
                if cache is not None:
                    cache.update(matrix=matrix, test=test)
            w, ok, condition = self._solve(matrix, -f_value)
            return w, ok, condition, torch.ones_like(ok, dtype=torch.int64)
        return self._newton(u, local, rows, inputs)

    def _newton(self, u, local, rows, inputs):
        batch, k, n_basis, _ = local.shape
        names = list(inputs)

        def field(w, u, local):
            return u + (w[:, :, None] @ local)[:, :, 0].sum(dim=1)

        with torch.no_grad():
            zero = self._residual_of(torch.zeros_like(u), inputs)
            data = torch.where(self.free, zero, 0.0).norm(dim=-1)  # (B,)
            w = local.new_zeros(batch, k, n_basis)
            ok = torch.ones(batch, k, dtype=torch.bool, device=local.device)
            done = torch.zeros_like(ok)
            iterations = torch.zeros(batch, k, dtype=torch.int64, device=local.device)
            condition = local.new_zeros(batch, k)
            # Problems that have converged are left as they are. On a GPU the loop runs
            # its full count, with no host synchronisation inside; on the CPU, where
            # asking costs nothing, it stops once every problem has converged.
            for iteration in range(self.max_iterations + 1):
                if local.device.type == "cpu" and bool(done.all()):
                    break
                f_value, matrix, test = self._system(field(w, u, local), local, rows, inputs)
                # Converged: the condition below `tolerance` times its scale, the test
                # fields' norm times the data's (the residual of the zero field), or a
                # step below `tolerance (1 + |w|)`. Not relative to the first value: after
                # a coarse solve that is small already, and where basis fields are
                # dependent on a patch the steps do not shrink (they move along the
                # dependent directions, which the ridge leaves free) while the
                # condition sits at rounding.
                scale = test.norm(dim=(-1, -2)) * data[:, None]
                done = done | (f_value.norm(dim=-1) <= self.tolerance * scale)
                if iteration == self.max_iterations:
                    break
                step, solved, condition = self._solve(matrix, -f_value)
                ok = ok & (solved | done)
                w = torch.where(done[..., None], w, w + step)
                iterations = iterations + (~done).to(torch.int64)
                done = done | (step.norm(dim=-1) <= self.tolerance * (1 + w.norm(dim=-1)))
            ok = ok & done  # not converged within max_iterations: reported

        jacobian = None
        if self.condition == "galerkin":
            # Galerkin's matrix (χΦ)ᵀ J (χΦ) is the condition's exact Jacobian: the
            # adjoint needs no second derivatives, and the condition no linearisation.
            with torch.no_grad():
                _, jacobian, _ = self._system(field(w, u, local), local, rows, inputs)

        def condition_of(w, u, local, *values):
            ins = dict(zip(names, values, strict=True))
            if self.condition == "galerkin":
                r = self._residual_of(field(w, u, local), ins)
                return (local @ r[:, None, :, None])[..., 0]
            f_value, _, _ = self._system(field(w, u, local), local, rows, ins)
            return f_value

        values = (inputs[name] for name in names)
        w = implicit_root(condition_of, w, u, local, *values, jacobian=jacobian)
        return w, ok, condition, iterations

    def _prepare(self, prediction, basis, inputs):
        self._check(prediction, basis)
        free = self.free.to(basis.device)
        # float64 throughout: the small systems are ill-conditioned in float32
        g = prediction[:, 0].double()
        phi = torch.where(free, basis.double(), 0.0)  # zero on Dirichlet DOFs
        return g, phi, {k: v.double() for k, v in inputs.items()}

    def _global(self, u, phi, inputs):
        """One solve over the whole domain: ``u + Φ w`` with the condition."""
        everywhere = torch.ones(1, u.shape[-1], dtype=phi.dtype, device=phi.device)
        w, ok, condition, iterations = self._experts(u, phi[:, None], everywhere, inputs)
        return u + (w @ phi)[:, 0], ok[:, 0], condition, iterations

    def _finish(self, u, ok, conditions, iterations, dtype, inputs: dict) -> torch.Tensor:
        """The output ``(B, 1, n)``, and :attr:`report` of this call, per sample:
        ``converged`` (every solve factorised and finite, every Newton iteration
        converged), ``singular`` (how many of its systems were numerically singular,
        solved through the ridge), ``condition`` (the largest condition number),
        ``iterations`` (sweeps, or for a nonlinear residual the Newton iterations of
        all its solves) and ``residual_norm`` (of the output, free DOFs)."""
        with torch.no_grad():
            r = torch.where(self.free, self._residual_of(u, inputs), 0.0)
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
        condition: ``"galerkin"`` or ``"least_squares"`` (Gauss-Newton iterations).
        ridge: added to the unit diagonal of each scaled system.
        max_iterations, tolerance: Newton's, for residuals that are not affine: a
            solve has converged when its condition has fallen below ``tolerance``
            times its scale (the test fields' norm times that of the residual of
            the zero field), or its step below ``tolerance (1 + |w|)``.

    Shapes:
        ``prediction (B, 1, n)``, ``basis (B, N, n)``, each input ``(B, n)`` ->
        ``(B, 1, n)`` in the prediction's dtype.
    """

    def __init__(
        self,
        residual: nn.Module,
        *,
        condition: str = "galerkin",
        ridge: float = 1e-12,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
    ):
        super().__init__(
            residual,
            condition=condition,
            ridge=ridge,
            max_iterations=max_iterations,
            tolerance=tolerance,
        )

    def forward(self, prediction, basis, **inputs):
        g, phi, inputs = self._prepare(prediction, basis, inputs)
        u, ok, condition, iterations = self._global(g, phi, inputs)
        return self._finish(u, ok, [condition], iterations.sum(dim=1), prediction.dtype, inputs)


class MoEConstraint(_Constraint):
    """Experts on overlapping subdomains, each solving for its own basis coefficients.

    Each sweep, expert ``k`` solves the condition for ``N`` coefficients of its basis
    ``χ_k Φ`` (the basis restricted to its extended set), the field outside held at
    its current values. With ``update="colours"`` (default) the experts go colour by
    colour: experts of one colour have disjoint extended sets and halos, so they are
    solved at once, each corrects its whole extended set, and the next colour sees
    the new field; for a symmetric positive definite problem each step minimises
    the energy over an expert's span, so the error cannot grow (BENCHMARKS.md
    measures it). With ``update="owners"`` every expert solves from the same field
    and each DOF takes its owner's correction. With ``coarse`` a global solve comes
    first. ``K = 1`` without ``coarse`` is :class:`HardConstraint`.

    The experts' matrices need ``J (χ_k Φ)``, which differs from ``χ_k (J Φ)`` at the
    edge of the extended set. One linearisation of the residual along
    ``Σ_{k in a colour} χ_k Φ`` gives each expert of the colour its own product on
    its rows, exactly: the cost is (colours) x N residual evaluations, whatever K.

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
        ridge, max_iterations, tolerance: as for :class:`HardConstraint`.

    Shapes:
        as for :class:`HardConstraint`.
    """

    def __init__(
        self,
        residual: nn.Module,
        partition,
        *,
        condition: str = "galerkin",
        overlap: int = 2,
        sweeps: int = 3,
        coarse: bool = True,
        update: str = "colours",
        ridge: float = 1e-12,
        max_iterations: int = 25,
        tolerance: float = 1e-10,
    ):
        super().__init__(
            residual,
            condition=condition,
            ridge=ridge,
            max_iterations=max_iterations,
            tolerance=tolerance,
        )
        if update not in UPDATES:
            raise ValueError(f"`update` must be one of {UPDATES}, got {update!r}")
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
            raise ValueError(f"`sweeps` must be a non-negative int, got {sweeps!r}")
        self.update = update
        self.strategy, self.overlap, self.sweeps, self.coarse = partition, overlap, sweeps, coarse
        self.partition = partition.partition(self.space, overlap=overlap)
        p = self.partition
        rows = p.extended | p.halo if condition == "least_squares" else p.extended
        self.register_buffer("owner", torch.from_numpy(p.labels), persistent=False)
        self.register_buffer("extended", torch.from_numpy(p.extended), persistent=False)
        self.register_buffer("rows", torch.from_numpy(rows), persistent=False)
        self.colours = _colours(p.extended | p.halo)

    def forward(self, prediction, basis, **inputs):
        g, phi, inputs = self._prepare(prediction, basis, inputs)
        batch = phi.shape[0]
        ok = torch.ones(batch, dtype=torch.bool, device=phi.device)
        iterations = torch.zeros(batch, dtype=torch.int64, device=phi.device)
        u, conditions = g, []
        if self.coarse:
            u, ok, condition, steps = self._global(u, phi, inputs)
            conditions.append(condition)
            iterations = iterations + steps.sum(dim=1)
        extended = self.extended.to(phi.dtype)  # (K, n)
        rows = self.rows.to(phi.dtype)
        if self.update == "owners":
            owned = nn.functional.one_hot(self.owner, self.partition.n_experts).T.to(phi.dtype)
        caches = [{} for _ in self.colours]  # an affine residual's matrices, per colour
        for _ in range(self.sweeps):
            if self.update == "owners":  # every expert's correction, combined at the end
                corrections = u.new_zeros(batch, self.partition.n_experts, u.shape[-1])
            start = u
            for colour, cache in zip(self.colours, caches, strict=True):
                local = phi[:, None] * extended[colour][None, :, None]  # χ_k Φ, (B, k, N, n)
                # colours: from the field the previous colours made; owners: all from
                # the sweep's starting field
                base = u if self.update == "colours" else start
                w, solved, condition, steps = self._experts(
                    base, local, rows[colour], inputs, cache
                )
                ok = ok & solved.all(dim=1)
                conditions.append(condition)
                iterations = iterations + steps.sum(dim=1)
                change = (w[:, :, None] @ local)[:, :, 0]  # (B, k, n)
                if self.update == "colours":
                    u = u + change.sum(dim=1)
                else:
                    corrections[:, colour] = change
            if self.update == "owners":
                u = start + (corrections * owned[None]).sum(dim=1)  # each DOF: its owner's
        return self._finish(u, ok, conditions, iterations, prediction.dtype, inputs)


def _colours(territory: np.ndarray) -> list[torch.Tensor]:
    """Experts in groups whose ``territory`` rows (K, n) do not meet: a greedy
    colouring of the graph in which experts are adjacent when their territories share
    a DOF. Returns the expert indices of each colour."""
    k = territory.shape[0]
    overlaps = (territory.astype(np.int64) @ territory.T.astype(np.int64)) > 0
    colour = np.full(k, -1)
    for expert in range(k):
        taken = {colour[other] for other in np.flatnonzero(overlaps[expert]) if other != expert}
        colour[expert] = next(c for c in range(k) if c not in taken)
    return [torch.from_numpy(np.flatnonzero(colour == c)) for c in range(colour.max() + 1)]
