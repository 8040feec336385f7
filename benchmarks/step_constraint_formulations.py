"""Formulations of the hard constraint per time step, measured on one heat trajectory.

A stepper's hard constraint makes each predicted state satisfy one step of a time
scheme, ``R(u_{n+1}; u_n) = 0``, in the span of a basis the network emits. Before
building more on it, this script measures the formulation on one trajectory of
fenop's heat family (65 x 65 P1, k = 0.1, a GRF initial state), as
``constraint_formulations.py`` did for the steady case.

The "model" is a stand-in for a trained stepper: from its own previous state it
guesses the data's next state with a smooth perturbation of relative size
``--guess`` (a new one each step), and 32 basis fields are built from the guess
(its products with x^i y^j, i, j < 4, and 16 smooth fields vanishing on the
boundary). Each variant constrains the guess of every step and the rollout goes on
from its output; the table gives the relative L2 error against the data after 1,
5 and 20 steps.

The data are saved every Δt = 0.005 but computed with ``s`` implicit Euler steps of
Δt / s each: with s = 1 the implicit Euler constraint's scheme is the data's own;
with larger s the data approach the exact evolution, and the constraint's one step
of Δt carries its own time-discretisation error (first order for implicit Euler,
second for Crank-Nicolson). A last column takes data made by Crank-Nicolson itself.

A second table takes the heat equation with no-flux (Neumann) boundaries, which
conserves the mass ∫u: it compares the drift of the mass over 20 steps with and
without the constant field in the basis (with it, the Galerkin condition tested
against 1 is the discrete mass balance, so the mass is conserved exactly), and
with the layers' own conservation (``conserve``, their default for such a
residual: the constant joins the network's fields, and a last correction by a
constant restores the balance after the sweeps and the grid), with and without
their default cycle (Jacobi sweeps and a coarse grid around the solve).

    python benchmarks/step_constraint_formulations.py
    python benchmarks/step_constraint_formulations.py --resolution 33   # quicker
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from fenop.data.pdes import Heat
from fenop.data.pdes.heat import HeatResidual
from fenop.fem import FunctionSpace, MetisPartition, RelativeL2Loss, unit_square
from fenop.operators import HardConstraint, MoEConstraint

# The variants as measured before the layers' default cycle: the condition alone
# (for a residual that is not affine, Newton's root) unless a variant names its
# sweeps and grid.
PLAIN = {"smoothing": 0, "coarse_grid": 0, "global_solve": "newton"}

K, DT, STEPS = 0.1, 0.005, 20


def _stepper(space: FunctionSpace, substeps: int, theta: float = 1.0):
    """The data's step: ``substeps`` θ-method steps of Δt / substeps (θ = 1:
    implicit Euler, 1/2: Crank-Nicolson)."""
    free = np.setdiff1d(np.arange(space.n_dofs), space.boundary_dofs)
    stiffness = (DT / substeps) * K * space.stiffness_matrix
    system = space.mass_matrix + theta * stiffness
    load = space.mass_matrix - (1 - theta) * stiffness
    factor = scipy.sparse.linalg.splu(scipy.sparse.csc_array(system)[free][:, free])

    def step(u: np.ndarray) -> np.ndarray:
        for _ in range(substeps):
            nxt = np.zeros_like(u)
            nxt[free] = factor.solve((load @ u)[free])
            u = nxt
        return u

    return step


def _basis(guess: torch.Tensor, x, y, bubble, n_basis: int, constant: bool) -> torch.Tensor:
    fields = [guess * x**i * y**j for i in range(4) for j in range(4)]
    rng = np.random.default_rng(1)
    while len(fields) < n_basis:
        kx, ky, phase = rng.uniform(1, 5), rng.uniform(1, 5), rng.uniform(0, np.pi)
        fields.append(bubble * torch.sin(kx * np.pi * x + phase) * torch.cos(ky * np.pi * y))
    fields = fields[:n_basis]
    if constant:
        fields[-1] = torch.ones_like(guess)
    return torch.stack(fields)[None]


def _rollout(space, u0, data_step, constraint, guess_error, *, constant=False, bubble=None):
    """Errors (per step) and masses of the stand-in model's rollout, and its ms/step."""
    x, y = (torch.from_numpy(c) for c in space.dof_points.T)
    if bubble is None:
        bubble = x * (1 - x) * y * (1 - y)
    loss = RelativeL2Loss(space)
    rng = np.random.default_rng(7)
    truth, state = torch.from_numpy(u0), torch.from_numpy(u0)
    errors, masses, seconds = [], [float(space.mass_matrix.sum(axis=0) @ u0)], 0.0
    for _ in range(STEPS):
        truth = torch.from_numpy(data_step(truth.numpy()))
        ideal = torch.from_numpy(data_step(state.numpy()))
        kx, ky, phase = rng.uniform(1, 4, size=2), rng.uniform(1, 4, size=2), rng.uniform(0, 6)
        wiggle = bubble * (
            torch.sin(kx[0] * np.pi * x + phase) * torch.cos(ky[0] * np.pi * y)
            + torch.cos(kx[1] * np.pi * x) * torch.sin(ky[1] * np.pi * y + phase)
        )
        scale = guess_error / loss((ideal + wiggle)[None, None], ideal[None, None]).item()
        guess = ideal + scale * wiggle
        if constraint is None:
            state = guess
        else:
            basis = _basis(guess, x, y, bubble, 32, constant)
            start = time.perf_counter()
            with torch.no_grad():
                state = constraint(guess[None, None], basis, u_prev=state[None])[0, 0]
            seconds += time.perf_counter() - start
        errors.append(loss(state[None, None], truth[None, None]).item())
        masses.append(float(space.mass_matrix.sum(axis=0) @ state.numpy()))
    return errors, masses, 1e3 * seconds / STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=65)
    parser.add_argument("--guess", type=float, default=0.05, help="relative L2 error per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)

    space = FunctionSpace(unit_square(args.resolution), dirichlet="boundary")
    heat = Heat(space, diffusivity=K, t_final=DT, n_steps=1)
    u0 = heat.sample(args.seed, 0)["u0"]
    implicit = HeatResidual(space, diffusivity=K, dt=DT)
    crank = HeatResidual(space, diffusivity=K, dt=DT, scheme="crank_nicolson")
    variants = {
        "none (the guess)": None,
        "global Galerkin, implicit Euler": HardConstraint(implicit, **PLAIN),
        "global Galerkin, Crank-Nicolson": HardConstraint(crank, **PLAIN),
        "two-level (K = 64, 3 sweeps), implicit Euler": MoEConstraint(
            implicit, MetisPartition(experts=64), sweeps=3, **PLAIN
        ),
        "two-level (K = 64, 3 sweeps), Crank-Nicolson": MoEConstraint(
            crank, MetisPartition(experts=64), sweeps=3, **PLAIN
        ),
    }
    print(
        f"heat, {args.resolution} x {args.resolution} P1 ({space.n_dofs} DOFs), k = {K}, "
        f"Δt = {DT}, {STEPS} steps, guess {100 * args.guess:g} % per step, N = 32; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print()
    print(
        "| constraint per step | data: implicit Euler, s = 1 (after 1, 5, 20 steps) | s = 4 "
        "| s = 16 | data: Crank-Nicolson, s = 1 | ms/step |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    steppers = {
        "ie1": _stepper(space, 1),
        "ie4": _stepper(space, 4),
        "ie16": _stepper(space, 16),
        "cn1": _stepper(space, 1, theta=0.5),
    }
    for name, constraint in variants.items():
        cells, ms = [], 0.0
        for step in steppers.values():
            errors, _, ms_s = _rollout(space, u0, step, constraint, args.guess)
            cells.append(", ".join(f"{100 * errors[i]:.3f}" for i in (0, 4, 19)))
            ms = max(ms, ms_s)
        print(f"| {name} | {' | '.join(cells)} | {ms:.0f} |")

    # No-flux boundaries: every DOF free, the mass conserved by the exact evolution.
    neumann = FunctionSpace(unit_square(args.resolution))
    g = Heat(FunctionSpace(unit_square(args.resolution), dirichlet="boundary"))
    start = g.random_field(np.random.default_rng(args.seed)) + 1.0
    free_step = _stepper(neumann, 1)
    residual = HeatResidual(neumann, diffusivity=K, dt=DT)
    ones = torch.ones(neumann.n_dofs)
    print()
    print("No-flux boundaries (mass conserved), s = 1:")
    print()
    print(
        "| constraint per step | L2 error after 1, 5, 20 steps | mass drift after 20 steps "
        "| ms/step |"
    )
    print("|---|---:|---:|---:|")
    loose = {"conserve": False}
    experts = MetisPartition(experts=64)
    for name, constraint, constant in (
        ("none (the guess)", None, False),
        ("global Galerkin, 32 fields", HardConstraint(residual, **PLAIN, **loose), False),
        (
            "global Galerkin, 31 fields and the constant",
            HardConstraint(residual, **PLAIN, **loose),
            True,
        ),
        ("global Galerkin, 32 fields, conserve", HardConstraint(residual, **PLAIN), False),
        ("global, default cycle, 32 fields", HardConstraint(residual, **loose), False),
        ("global, default cycle, 32 fields, conserve", HardConstraint(residual), False),
        ("two-level (K = 64), default cycle", MoEConstraint(residual, experts, **loose), False),
        ("two-level (K = 64), default cycle, conserve", MoEConstraint(residual, experts), False),
    ):
        errors, masses, ms = _rollout(
            neumann, start, free_step, constraint, args.guess, constant=constant, bubble=ones
        )
        drift = abs(masses[-1] - masses[0]) / abs(masses[0])
        cells = ", ".join(f"{100 * errors[i]:.3f}" for i in (0, 4, 19))
        print(f"| {name} | {cells} | {drift:.1e} | {ms:.0f} |")


if __name__ == "__main__":
    main()
