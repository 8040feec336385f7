"""The experts' sweeps of an affine residual (or a linearisation), colour by colour:
one loop, run under autograd when the experts are sharded over processes and with
its backward pass written out on one process; and the report gathered over
processes when sharded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fenop.operators.constraints.factorisation import DenseSystems, Factorisation
from fenop.operators.constraints.fields import _combined, _IndexSets, _tested


@dataclass
class ColourSystem:
    """One colour's experts, ready to sweep: their ``extended`` sets and ``rows``
    (:class:`_IndexSets`), the ``test`` fields and the index sets ``on`` which they
    test ``R``, what the condition's gradient needs (``placed``), the ``factors`` of
    their matrices and their ``condition`` numbers ``(B, k)``."""

    extended: _IndexSets
    rows: _IndexSets
    test: torch.Tensor
    on: _IndexSets
    placed: tuple | None
    factors: Factorisation
    condition: torch.Tensor


def colour_systems(rule, systems: DenseSystems, groups, places, locals_, applieds):
    """Per colour a :class:`ColourSystem`, for the condition ``rule``, from the
    colours' ``(extended, rows, blocks)`` ``groups``, where each extended set sits in
    its rows (``places``, ``(k, m)`` each, or ``None``), the experts' bases
    ``locals_`` ``(B, k, N, m)`` and their products ``applieds = J (χ_k Φ)`` on the
    rows ``(B, k, N, m_r)``. Differentiable where the fields are."""
    out = []
    for (extended, rows, _), place, local, applied in zip(
        groups, places, locals_, applieds, strict=True
    ):
        test, on, matrix, placed = rule.colour_system(local, applied, extended, rows, place)
        factors = systems.factorise(matrix)
        out.append(ColourSystem(extended, rows, test, on, placed, factors, factors.condition()))
    return out


def run_sweeps(
    colours: list[ColourSystem], r, applieds, sweeps: int, *, steps=None, read=None, write=None
):
    """``sweeps`` sweeps over ``colours`` from ``r = R(u)`` ``(B, n)``: each colour's
    experts solve their condition for ``R`` as the colours before left it, and
    ``R`` moves by ``Σ_j w_j J (χ_k Φ_j)`` on their rows (``applieds``, per colour
    ``(B, k, N, m_r)``), so that no sweep evaluates the residual or multiplies by
    the whole ``J``. ``read`` and ``write`` carry ``R`` into this process's share of
    the experts and their changes of it out (the identity on one process);
    ``steps``, where given, collects each solve's ``(colour, R read, w, whether R
    moved after it)`` for a backward pass. Returns each colour's coefficients
    summed over the sweeps ``(B, k, N)`` and whether every solve succeeded ``(B,)``."""
    read = read or (lambda x: x)
    write = write or (lambda x: x)
    totals = [0.0] * len(colours)
    ok = torch.ones(len(r), dtype=torch.bool, device=r.device)
    for sweep in range(sweeps):
        for c, colour in enumerate(colours):
            r_on = colour.on.gather(read(r))
            w, solved = colour.factors.solve(-_tested(colour.test, r_on))
            totals[c] = totals[c] + w
            moved = sweep < sweeps - 1 or c < len(colours) - 1  # R is read again
            if moved:
                r = r + write(colour.rows.scatter(_combined(w, applieds[c])))
            ok = ok & solved.all(dim=1)
            if steps is not None:
                steps.append((c, r_on, w, moved))
    return totals, ok


def swept_change(colours: list[ColourSystem], locals_, totals) -> torch.Tensor:
    """``(B, n)``: the field's change, every expert's bases ``locals_`` ``(B, k, N, m)``
    times its coefficients summed over the sweeps ``totals`` ``(B, k, N)``: as only
    ``R`` steers the solves, the field takes them once, at the end."""
    return sum(
        colour.extended.scatter(_combined(total, local))
        for colour, local, total in zip(colours, locals_, totals, strict=True)
    )


class _TrackedSweeps(torch.autograd.Function):
    """:func:`run_sweeps` on one process, with its backward pass written out: from
    the colours' systems (formed without a graph), the condition ``rule``, the
    number of sweeps, ``u`` and ``r = R(u)`` ``(B, n)``, and per colour the experts'
    bases ``χ_k Φ`` ``(B, k, N, m)`` and then their products ``J (χ_k Φ)`` on the
    rows ``(B, k, N, m_r)``. Returns ``u`` after the sweeps ``(B, n)`` and whether
    every solve succeeded ``(B,)``.

    Going back through the solves (colour ``c`` of sweep ``s``:
    ``w = -M⁻¹ T r_on``, then ``r += scatter(Aᵀ w)``), with ``r̄`` the running
    gradient of ``r``: ``w̄ = χ_k Φ ū + A r̄_rows``, ``λ = -M⁻ᵀ w̄``,
    ``r̄ += scatter(Tᵀ λ)``. The basis-sized gradients are sums over the sweeps of
    outer products, ``Σ_s λ_s r_onᵀ`` and ``Σ_s w_s r̄_rowsᵀ``, formed as one product
    per colour over the sweeps stacked, where autograd forms two per solve and adds
    them up; ``M̄ = Σ_s λ_s w_sᵀ`` then goes to ``M``'s factors
    (``rule.colour_backward``). As for :class:`_GalerkinSolve
    <fenop.operators.constraints.galerkin._GalerkinSolve>`, the scaling and ridge
    are taken as constants, and ``M̄`` is not made symmetric: the gradients are
    autograd's for every perturbation that keeps a symmetric system symmetric
    (tested). Once differentiable."""

    @staticmethod
    def forward(ctx, colours, rule, sweeps, u, r, *fields):
        locals_, applieds = fields[: len(colours)], fields[len(colours) :]
        steps = []
        totals, ok = run_sweeps(colours, r, applieds, sweeps, steps=steps)
        ctx.colours, ctx.rule, ctx.steps, ctx.totals = colours, rule, steps, totals
        ctx.save_for_backward(*locals_, *applieds)
        ctx.mark_non_differentiable(ok)
        return u + swept_change(colours, locals_, totals), ok

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ok):
        colours = ctx.colours
        count = len(colours)
        locals_, applieds = ctx.saved_tensors[:count], ctx.saved_tensors[count:]
        grad_on = [colour.extended.gather(grad) for colour in colours]  # ū, (B, k, m)
        # the gradient of each colour's coefficients summed over the sweeps
        grad_totals = [
            (loc @ g[..., None])[..., 0] for loc, g in zip(locals_, grad_on, strict=True)
        ]
        grad_r = torch.zeros_like(grad)
        lams, r_ons = [[] for _ in colours], [[] for _ in colours]
        moved_ws, grad_rows = [[] for _ in colours], [[] for _ in colours]
        grad_matrix = [0.0] * count
        for c, r_on, w, moved in reversed(ctx.steps):
            colour = colours[c]
            grad_w = grad_totals[c]
            if moved:
                g_rows = colour.rows.gather(grad_r)
                grad_w = grad_w + (applieds[c] @ g_rows[..., None])[..., 0]
                moved_ws[c].append(w)
                grad_rows[c].append(g_rows)
            lam = -colour.factors.solve(grad_w, adjoint=True)[0]
            grad_r = grad_r + colour.on.scatter((lam[..., None, :] @ colour.test)[..., 0, :])
            lams[c].append(lam)
            r_ons[c].append(r_on)
            grad_matrix[c] = grad_matrix[c] + lam[..., :, None] * w[..., None, :]
        grad_locals, grad_applieds = [], []
        for c, colour in enumerate(colours):
            # Σ_s λ_s r_onᵀ (the test fields'), one product over the sweeps stacked
            grad_test = torch.stack(lams[c], dim=-1) @ torch.stack(r_ons[c], dim=-2)
            grad_local = ctx.totals[c][..., :, None] * grad_on[c][..., None, :]
            if moved_ws[c]:
                grad_applied = torch.stack(moved_ws[c], dim=-1) @ torch.stack(grad_rows[c], dim=-2)
            else:  # one sweep, the last colour: R did not move
                grad_applied = torch.zeros_like(applieds[c])
            grad_local, grad_applied = ctx.rule.colour_backward(
                grad_test,
                grad_matrix[c],
                locals_[c],
                colour.test,
                colour.placed,
                grad_local,
                grad_applied,
            )
            grad_locals.append(grad_local)
            grad_applieds.append(grad_applied)
        return None, None, None, grad, grad_r, *grad_locals, *grad_applieds


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
