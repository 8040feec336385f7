"""The experts' sweeps on one process with their backward pass written out, and the
report gathered over processes when the experts are sharded."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
            factors = layer._factorise(matrix)
            systems.append((test, on, placed, factors))
            conditions.append(factors.condition())
        totals = [0.0] * colours
        steps = []  # per solve: its colour, R where it read it, its coefficients, whether R moved
        for sweep in range(layer.sweeps):
            for c, (test, on, _, factors) in enumerate(systems):
                r_on = on.gather(r)
                w, solved = factors.solve(-(test @ r_on[..., None])[..., 0])
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
            lam = -factors.solve(grad_w, adjoint=True)[0]
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
