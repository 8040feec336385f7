"""Root finders for the constraints' nonlinear problems: Newton, chord, Levenberg-Marquardt.

A problem is a batch of independent condition systems ``F(w) = 0``, ``w``
``(B, k, N)``, block ``k`` of ``F`` depending on block ``k`` of ``w`` alone (an
expert each, or one global solve). It gives its condition and matrix at a point
(:meth:`RootProblem.linearised`), or the condition alone where that is cheaper
(:meth:`RootProblem.value`). A finder iterates every problem at once, with a
convergence mask per problem and, on a GPU, no host synchronisation in the loop
(it runs its full count there; on the CPU, where asking costs nothing, it stops
once every problem has converged). Problems that have converged are left as they
are. :class:`Stopping` says when a problem has converged.

No graph is recorded: the caller differentiates the root it returns by the
implicit function theorem (:mod:`fenop.operators.implicit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from fenop.operators.constraints.factorisation import DenseSystems

# Levenberg-Marquardt's first damping, relative to the Gauss-Newton matrix's diagonal.
_DAMPING = 1e-3


class Linearisation(NamedTuple):
    """A problem at a point ``w`` ``(B, k, N)``: the condition ``value`` ``(B, k, N)``,
    its (Gauss-Newton, for least squares) ``matrix`` ``(B, k, N, N)``, the ``test``
    fields ``(B, k, N, m)`` that tested the residual (their norm scales the
    convergence test) and the ``objective`` ``|R|²`` on each problem's rows ``(B, k)``."""

    value: torch.Tensor
    matrix: torch.Tensor
    test: torch.Tensor
    objective: torch.Tensor

    def where(self, mask: torch.Tensor, other: Linearisation) -> Linearisation:
        """This one where ``mask`` ``(B, k)`` holds, ``other`` elsewhere (a member the
        two share, as chord iterations share their matrix and test fields, is kept
        as it is: no copy)."""
        return Linearisation(
            *(
                a if a is b else torch.where(mask.reshape(*mask.shape, *(1,) * (a.ndim - 2)), a, b)
                for a, b in zip(self, other, strict=True)
            )
        )

    def rows(self, index: torch.Tensor) -> Linearisation:
        """The samples ``index`` ``(b,)`` of it."""
        return Linearisation(*(a[index] for a in self))

    def with_rows(
        self, index: torch.Tensor, part: Linearisation, taken: Linearisation
    ) -> Linearisation:
        """This one with the samples ``index`` replaced by ``part``'s; a member that
        ``part`` kept from ``taken`` (``self.rows(index)``), as a chord keeps its
        test fields, stays this one's, uncopied."""
        return Linearisation(
            *(
                a if b is t else a.index_copy(0, index, b)
                for a, b, t in zip(self, part, taken, strict=True)
            )
        )


class RootProblem(Protocol):
    """What a root finder asks of a problem; ``rows(index)``, the problem of the
    samples ``index`` alone, is optional (see :meth:`_RootFinder._live_trial`)."""

    def linearised(self, w: torch.Tensor) -> Linearisation: ...

    def value(self, w: torch.Tensor) -> torch.Tensor: ...


class RootResult(NamedTuple):
    """The root ``solution`` ``(B, k, N)``; whether each problem ``converged`` (every
    solve succeeded and the stopping rule held) ``(B, k)``; its ``iterations``
    ``(B, k)``; the scaled ``condition`` number of the last matrix it stepped with
    ``(B, k)``; and that ``matrix`` ``(B, k, N, N)`` (undamped; a chord iteration's
    is an earlier iterate's)."""

    solution: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    condition: torch.Tensor
    matrix: torch.Tensor


@dataclass(frozen=True)
class Stopping:
    """A problem has converged when its condition has fallen below ``tolerance``
    times its scale (the test fields' norm times the data's, ``data`` ``(B,)``: the
    residual of the zero field), or its step below ``tolerance (1 + |w|)``; else
    it is reported unconverged after ``max_iterations``. Not relative to the first
    value: after a coarse solve that is small already, and where basis fields are
    dependent on a patch the steps do not shrink (they move along the dependent
    directions, which the ridge leaves free) while the condition sits at rounding."""

    max_iterations: int = 25
    tolerance: float = 1e-10

    def scale(self, test: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """``(B, k)``: the test fields' norm ``(B, k, N, m)`` times the data's ``(B,)``."""
        return test.norm(dim=(-1, -2)) * data[:, None]

    def small_value(self, state: Linearisation, scale: torch.Tensor) -> torch.Tensor:
        return state.value.norm(dim=-1) <= self.tolerance * scale

    def small_step(self, step: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return step.norm(dim=-1) <= self.tolerance * (1 + w.norm(dim=-1))


class _RootFinder:
    """The iteration every finder shares: ``w ← w + step`` with the step from the
    factorised matrix, accepted or not per problem; the subclasses choose the
    matrix, the trial point's linearisation and the acceptance."""

    def __init__(self, *, systems: DenseSystems, stopping: Stopping):
        self.systems, self.stopping = systems, stopping

    def solve(self, problem: RootProblem, w: torch.Tensor, data: torch.Tensor) -> RootResult:
        """The root of ``problem`` from ``w`` ``(B, k, N)``, converged relative to
        ``data`` ``(B,)`` (see :class:`Stopping`)."""
        with torch.no_grad():
            device = w.device
            ok = torch.ones(w.shape[:2], dtype=torch.bool, device=device)
            done = torch.zeros_like(ok)
            iterations = torch.zeros(w.shape[:2], dtype=torch.int64, device=device)
            state = problem.linearised(w)
            self._start(state)
            scaled = None  # the test fields the scale is of: a chord keeps them
            for iteration in range(self.stopping.max_iterations + 1):
                if state.test is not scaled:
                    scaled, scale = state.test, self.stopping.scale(state.test, data)
                done = done | self.stopping.small_value(state, scale)
                if iteration == self.stopping.max_iterations or (
                    device.type == "cpu" and bool(done.all())
                ):
                    break
                step, solved = self.systems.factorise(self._matrix(state)).solve(-state.value)
                ok = ok & (solved | done)
                trial_w = torch.where(done[..., None], w, w + step)
                trial = self._live_trial(problem, trial_w, state, done)
                accept = ~done & self._accepts(trial, state)
                iterations = iterations + (~done).to(torch.int64)
                w = torch.where(accept[..., None], trial_w, w)
                state = trial.where(accept, state)
                done = done | self.stopping.small_step(step, w)
            # the last iterate's matrix: its condition once, not every iteration
            condition = self.systems.condition(state.matrix)
        return RootResult(w, ok & done, iterations, condition, state.matrix)

    def _live_trial(self, problem, w, state, done) -> Linearisation:
        """:meth:`_trial` of the samples with a problem still iterating alone, on the
        CPU and where the problem has ``rows``: a residual is evaluated per sample,
        and the samples of a batch converge in different numbers of iterations (6
        to 12 in a batch of 8 Allen-Cahn steps), so the evaluations of those that
        have are saved. On a GPU, where asking which would synchronise, of all."""
        live = ~done.all(dim=1)
        if w.device.type != "cpu" or not hasattr(problem, "rows") or bool(live.all()):
            return self._trial(problem, w, state, done)
        index = live.nonzero()[:, 0]
        taken = state.rows(index)
        part = self._trial(problem.rows(index), w[index], taken, done[index])
        return state.with_rows(index, part, taken)

    def _start(self, state: Linearisation) -> None:
        """Before the first iteration, from the starting point's linearisation."""

    def _matrix(self, state: Linearisation) -> torch.Tensor:
        return state.matrix

    def _trial(self, problem, w, state, done) -> Linearisation:
        return problem.linearised(w)

    def _accepts(self, trial: Linearisation, state: Linearisation) -> torch.Tensor:
        return torch.ones_like(trial.objective, dtype=torch.bool)


class Newton(_RootFinder):
    """Newton's method; with ``chord``, chord iterations: the matrix of the first
    iterate is kept, so an iteration costs the condition alone (for Galerkin, one
    residual evaluation instead of a linearisation: one per colour of the
    pattern), converging to the same root. A chord step that has not halved the
    condition gets the matrix at its point next (Newton's step): the chord's
    linear rate is slow where the matrix moves. On a GPU, where asking whether any
    problem is slow would synchronise, that matrix is computed always."""

    def __init__(self, *, systems: DenseSystems, stopping: Stopping, chord: bool = False):
        super().__init__(systems=systems, stopping=stopping)
        self.chord = chord

    def _trial(self, problem, w, state, done) -> Linearisation:
        if not self.chord:
            return problem.linearised(w)
        value = problem.value(w)
        matrix = state.matrix
        slow = ~done & (value.norm(dim=-1) > 0.5 * state.value.norm(dim=-1))
        if w.device.type != "cpu" or bool(slow.any()):
            matrix = torch.where(slow[..., None, None], problem.linearised(w).matrix, matrix)
        return Linearisation(value, matrix, state.test, state.objective)


class LevenbergMarquardt(_RootFinder):
    """Levenberg-Marquardt for least squares, ``λ`` per problem with Marquardt's
    scaling (the matrix's diagonal): a step that raises ``|R|²`` (beyond rounding)
    is refused and ``λ`` raised tenfold; an accepted one lowers it tenfold, so that
    near the solution the steps are Gauss-Newton's and converge as fast."""

    def _start(self, state: Linearisation) -> None:
        self.damping = torch.full_like(state.objective, _DAMPING)

    def _matrix(self, state: Linearisation) -> torch.Tensor:
        diagonal = torch.diagonal(state.matrix, dim1=-2, dim2=-1)
        return state.matrix + torch.diag_embed(self.damping[..., None] * diagonal)

    def _accepts(self, trial: Linearisation, state: Linearisation) -> torch.Tensor:
        accept = trial.objective <= state.objective * (1 + 1e-13)
        self.damping = torch.where(accept, self.damping / 10, self.damping * 10).clamp(0, 1e12)
        return accept
