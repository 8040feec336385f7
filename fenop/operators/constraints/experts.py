"""MoEConstraint: experts on overlapping subdomains after a global solve."""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.colouring import colour_graph
from fenop.operators import sharding
from fenop.operators.constraints.common import (
    NONLINEAR,
    UPDATE_ALIASES,
    UPDATES,
    Condition,
    GlobalSolve,
    Nonlinear,
    Update,
)
from fenop.operators.constraints.fields import _combined, _Constant, _IndexSets
from fenop.operators.constraints.layer import _Constraint
from fenop.operators.constraints.sweeps import (
    _gathered_report,
    _TrackedSweeps,
    colour_systems,
    run_sweeps,
    swept_change,
)


class MoEConstraint(_Constraint):
    """Experts on overlapping subdomains, each solving for its own basis coefficients:
    a two-level overlapping Schwarz method in the span of the basis.

    Each sweep, expert ``k`` solves the condition for ``N`` coefficients of its basis
    ``χ_k Φ`` (the basis restricted to its extended set), the field outside held at
    its current values. With ``update="multiplicative"`` (default; multiplicative
    Schwarz) the experts go colour by colour: no expert of a colour reads the
    residual where another's correction moves it (Galerkin: no extended set meets
    another's extended set or halo; least squares: nor halo another halo), so
    solving them at once is solving them one after the other; each corrects its
    whole extended set, and the next colour sees the new field; for a symmetric
    positive definite problem each step minimises the energy over an expert's
    span, so the error cannot grow (BENCHMARKS.md measures it). With
    ``update="restricted_additive"`` (restricted additive Schwarz) every expert
    solves from the same field and each DOF takes its owner's correction. With
    ``coarse`` a global solve comes first (the coarse level).
    ``K = 1`` without ``coarse`` is :class:`HardConstraint`.

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
        update: ``"multiplicative"`` or ``"restricted_additive"`` (also by their
            former names, ``"colours"`` and ``"owners"``).
        nonlinear: for a residual that is not affine, ``"linearised"`` (default): the
            experts' sweeps solve its linearisation at the field they start from (the
            coarse solution), one Newton step of the two-level iteration, with the
            affine residual's machinery, the gradient through the linearisation too;
            ``"newton"``: each expert solves its own nonlinear problem by Newton's
            method (chord iterations) with the implicit function theorem's gradient.
            The coarse solve is the one of ``global_solve``; the grid and the last
            smoothing sweeps solve the linearised sweeps' linearisation (with
            ``"newton"``, the residual linearised at the experts' output). Measured
            on one sample (benchmarks/history.md, "Nonlinear experts"): the outputs
            agree to 1e-4 relative, below the errors both leave, and the linearised
            sweeps cost 3-9x less.
        ridge, max_iterations, tolerance, chord, smoothing, global_solve, coarse_grid:
            as for :class:`HardConstraint`, with the same defaults (the smoothing
            sweeps come before the coarse solve and after the experts';
            ``global_solve`` is the coarse solve's, ``"auto"`` choosing as there;
            the grid's correction comes after the experts').
        conserve: as for :class:`HardConstraint` (the constant joins each
            expert's fields too).
        frozen_jacobian: as for :class:`HardConstraint` (also the linearised
            sweeps' linearisation).

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
        update: Update = "multiplicative",
        nonlinear: Nonlinear = "linearised",
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
        super().__init__(
            residual,
            condition=condition,
            ridge=ridge,
            max_iterations=max_iterations,
            tolerance=tolerance,
            chord=chord,
            smoothing=smoothing,
            global_solve=global_solve,
            coarse_grid=coarse_grid,
            conserve=conserve,
            frozen_jacobian=frozen_jacobian,
        )
        if isinstance(update, str):
            update = UPDATE_ALIASES.get(update, update)
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
        self.tracked = self.linear_sweeps and update == "multiplicative"
        self.strategy, self.overlap, self.sweeps, self.coarse = partition, overlap, sweeps, coarse
        self.partition = p = partition.partition(self.space, overlap=overlap)
        # An expert's rows: least squares' residual rows, or where R moves when the
        # sweeps track it, are its extended set and halo (J reaches one layer out).
        self.halo_rows = self.rule.reads_halo or self.tracked
        self.rows = p.extended | p.halo if self.halo_rows else p.extended
        # where an expert's condition reads R, and where its correction moves it
        reads = p.extended | p.halo if self.rule.reads_halo else p.extended
        self.colours = _solving_groups(reads, p.extended | p.halo)
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
        self.places = nn.ModuleList()  # per colour (tracked sweeps): extended sets in rows
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
            if self.tracked:
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
        linearised = self.coarse and self.global_solve == "linearised"
        # Newton's scale, the same for every solve: where one runs (a residual that is
        # not affine, in the coarse solve or the experts' own)
        newton = not self.affine and (
            (self.coarse and self.global_solve == "newton") or not self.linear_sweeps
        )
        data = self._data_norm(g, inputs) if newton else None
        # as HardConstraint's: the stages before the coarse solve (and, linearised,
        # the solve) on the residual linearised at the prediction
        start = self._stage_linear(g, inputs, linear, self.smoothing or linearised)
        u, conditions = self._smoothed(g, start, prediction.dtype), []
        if self.coarse:
            u, ok, condition, steps = self._global(
                u, phi, inputs, start if linearised else linear, data
            )
            conditions.append(condition)
            iterations = iterations + steps.sum(dim=1)
        # The sweeps' affine residual: a residual's own (R(0), J), or, for one that is
        # not affine, its linearisation at the sweeps' starting field, R(u) - J u and
        # J; none where the experts solve their own nonlinear problems.
        sweep_linear, r_start = linear, None
        if self.linear_sweeps and not self.affine:
            if self.frozen_jacobian:  # R(u) below: the fixed J u + R(0), the same value
                sweep_linear = self._stage_linear(u, inputs, linear, True)
            else:
                sweep_linear, r_start = self._linearised_at(u, inputs)
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
        # the grid and the last sweeps: on the sweeps' linearisation where they solved
        # one, else on the residual linearised at the experts' output
        end = sweep_linear
        if end is None and not self.affine:
            after = self.smoothing or self.coarse_space is not None
            end = self._stage_linear(u, inputs, linear, after)
        u, coarse_ok = self._coarse_corrected(u, end, inputs)
        ok = ok & expert_ok & coarse_ok
        iterations = iterations + expert_iterations
        conditions = conditions + expert_conditions
        u = self._conserved(self._smoothed(u, end, prediction.dtype), linear)
        return self._finish(u, ok, conditions, iterations, prediction.dtype, inputs)

    def _tracked_sweeps(self, u, r, phi, values):
        """The sweeps colour by colour for an affine residual (or a linearisation) of
        Jacobian entries ``values`` ``(B, nnz)``, from ``u`` and ``r = R(u)`` ``(B, n)``,
        with the basis ``phi`` ``(B, N, n)`` (:func:`~fenop.operators.constraints.
        sweeps.run_sweeps`). What does not depend on the field (the matrices, their
        factors and condition numbers) is formed once per colour, before the sweeps.
        On one process their backward pass is written out (:class:`_TrackedSweeps`);
        sharded, autograd goes through them and the sums over the processes
        (:meth:`_sweeps_through_autograd`).

        Returns ``u`` ``(B, n)``, whether every solve succeeded ``(B,)``, the number of
        expert solves ``(B,)`` and their condition numbers (``(B, k)`` per solve)."""
        if not self.sweeps:
            ok = torch.ones(len(u), dtype=torch.bool, device=u.device)
            return u, ok, torch.zeros(len(u), dtype=torch.int64, device=u.device), []
        locals_, applieds = self._experts_fields(phi, values)
        if self.world > 1:
            return self._sweeps_through_autograd(u, r, locals_, applieds)
        with torch.no_grad():
            colours = self._colour_systems(locals_, applieds)
        u, ok = _TrackedSweeps.apply(colours, self.rule, self.sweeps, u, r, *locals_, *applieds)
        return u, ok, *self._sweeps_report(colours, len(u))

    def _experts_fields(self, phi, values):
        """Per colour, the experts' bases ``χ_k Φ`` on their extended sets
        ``(B, k, N, m)`` and their products ``J (χ_k Φ)`` on their rows
        ``(B, k, N, m_r)``, for the basis ``phi`` ``(B, N, n)`` and ``J``'s entries."""
        locals_ = _IndexSets.gather_all([extended for extended, _, _ in self.groups], phi)
        applieds = [
            blocks.matmul(values, local)
            for (_, _, blocks), local in zip(self.groups, locals_, strict=True)
        ]
        return locals_, applieds

    def _colour_systems(self, locals_, applieds):
        places = [place.value for place in self.places]
        return colour_systems(self.rule, self.systems, self.groups, places, locals_, applieds)

    def _sweeps_through_autograd(self, u, r, locals_, applieds):
        """:meth:`_tracked_sweeps` with autograd through every solve and through the
        sums over processes, from the experts' fields (:meth:`_experts_fields`);
        returns as it does."""
        colours = self._colour_systems(locals_, applieds)
        totals, ok = run_sweeps(
            colours, r, applieds, self.sweeps, read=sharding.to_shards, write=sharding.from_shards
        )
        u = u + sharding.from_shards(swept_change(colours, locals_, totals))
        return u, ok, *self._sweeps_report(colours, len(u))

    def _sweeps_report(self, colours, batch: int):
        """The number of this process's expert solves ``(batch,)`` (not the padding
        of its share) and their condition numbers, one ``(B, k)`` per solve."""
        real = sum(colour.extended.valid.any(dim=-1).sum() for colour in colours)
        return (self.sweeps * real).expand(batch), [c.condition for c in colours] * self.sweeps

    def _solved_sweeps(self, u, phi, inputs, linear, data):
        """The sweeps that evaluate the residual: the experts' own Newton solves, or
        (``update="restricted_additive"``) every expert solving from the sweep's
        starting field ``u`` ``(B, n)``, each DOF taking its owner's correction.
        Returns as :meth:`_tracked_sweeps`, the solves counted by their Newton
        iterations."""
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
                base = sharding.to_shards(u if self.update == "multiplicative" else start)
                w, solved, condition, steps = self._experts(
                    base, local, tuple(sets), inputs, linear, cache, subset, data=data
                )
                ok = ok & solved.all(dim=1)
                conditions.append(condition)
                real = sets[0].valid.any(dim=-1)  # not the padding of a process's share
                iterations = iterations + (steps * real).sum(dim=1)
                change = _combined(w, local)  # (B, k, m)
                if self.update == "multiplicative":
                    u = u + sharding.from_shards(sets[0].scatter(change))
                else:  # each DOF takes its owner's correction, at the end of the sweep
                    corrections.append(sharding.from_shards(sets[0].scatter(change * owned.value)))
            if self.update == "restricted_additive":
                u = start + sum(corrections)
        return u, ok, iterations, conditions


def _solving_groups(reads: np.ndarray, writes: np.ndarray) -> list[np.ndarray]:
    """Experts in groups that can solve at once: no expert of a group reads (the rows
    of its condition, ``reads`` ``(K, n)`` bool) where another writes (where its
    correction moves the residual, ``writes`` ``(K, n)``), so that solving a group's
    experts together is solving them one after the other. The colours of the
    graph of such conflicts (DSATUR, :func:`~fenop.fem.colour_graph`); returns the
    expert indices of each colour."""
    read = scipy.sparse.csr_array(reads.astype(np.float64))
    write = scipy.sparse.csr_array(writes.astype(np.float64))
    colour = colour_graph(scipy.sparse.csr_array(read @ write.T))
    return [np.flatnonzero(colour == c) for c in range(colour.max() + 1)]
