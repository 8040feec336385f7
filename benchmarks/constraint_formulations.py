"""Formulations of the hard-constraint layer, measured on one sample of a PDE family.

A sample of fenop's Darcy family (or, ``--pde nonlinear_diffusion``,
-div((1 + u²) ∇u) = f) at R x R (P1), a "network guess" made by adding a
smooth perturbation to its FE solution (relative L2 error ``--guess``), and N basis
fields built from the guess: its products with the monomials ``x^i y^j`` (16), and
for N = 32 also 16 smooth fields vanishing on the boundary. Each formulation
constrains the guess; the table gives the FE relative L2 error of its output
against the FE solution and the time of one forward pass.

    python benchmarks/constraint_formulations.py
    python benchmarks/constraint_formulations.py --resolution 33 --basis 16    # quicker
    python benchmarks/constraint_formulations.py --pde nonlinear_diffusion

For a residual that is not affine the table adds the experts' two treatments
(``MoEConstraint(nonlinear=..., **PLAIN)``): the linearisation at the coarse solution (the
default) and each expert's own Newton solve.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, RelativeL2Loss, unit_square
from fenop.operators import HardConstraint, MoEConstraint

# The variants as measured before the layers' default cycle: the condition alone
# (for a residual that is not affine, Newton's root) unless a variant names its
# sweeps and grid.
PLAIN = {"smoothing": 0, "coarse_grid": 0, "global_solve": "newton"}


def _case(pde: str, n: int, guess_error: float, seed: int):
    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    family = get_pde(pde)(space)
    sample = family.sample(seed, 0)
    (name,) = family.inputs
    a, u = (torch.from_numpy(sample[k])[None] for k in (name, "u"))
    x, y = (torch.from_numpy(c) for c in space.dof_points.T)
    bubble = x * (1 - x) * y * (1 - y)
    perturbation = bubble * torch.sin(3 * np.pi * x + 0.4) * torch.cos(2 * np.pi * y)
    loss = RelativeL2Loss(space)
    scale = guess_error / loss((u + perturbation)[:, None], u[:, None]).item()
    guess = u + scale * perturbation
    return space, family.residual(), {name: a}, u, guess, (x, y, bubble), loss


def _basis(guess, coordinates, n_basis: int) -> torch.Tensor:
    x, y, bubble = coordinates
    fields = [guess[0] * x**i * y**j for i in range(4) for j in range(4)]
    rng = np.random.default_rng(1)
    while len(fields) < n_basis:
        kx, ky, phase = rng.uniform(1, 5), rng.uniform(1, 5), rng.uniform(0, np.pi)
        fields.append(bubble * torch.sin(kx * np.pi * x + phase) * torch.cos(ky * np.pi * y))
    return torch.stack(fields[:n_basis])[None]


def _variants():
    metis = MetisPartition
    return {
        "global, least squares": lambda r: HardConstraint(r, condition="least_squares", **PLAIN),
        "global, Galerkin": lambda r: HardConstraint(r, **PLAIN),
        "experts, least squares, no overlap, no coarse solve (K=16)": lambda r: MoEConstraint(
            r,
            metis(experts=16),
            condition="least_squares",
            overlap=0,
            coarse=False,
            sweeps=1,
            update="restricted_additive",
            **PLAIN,
        ),
        "two-level Galerkin, 3 sweeps, owners' values (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=3, update="restricted_additive", **PLAIN
        ),
        "two-level Galerkin, 3 sweeps, colour by colour (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=3, **PLAIN
        ),
        "two-level Galerkin, 10 sweeps, owners' values (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=10, update="restricted_additive", **PLAIN
        ),
        "two-level Galerkin, 10 sweeps, colour by colour (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=10, **PLAIN
        ),
        "two-level Galerkin, 30 sweeps, owners' values (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=30, update="restricted_additive", **PLAIN
        ),
        "two-level Galerkin, 30 sweeps, colour by colour (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), sweeps=30, **PLAIN
        ),
        "two-level least squares, 3 sweeps, colour by colour (K=64)": lambda r: MoEConstraint(
            r, metis(experts=64), condition="least_squares", sweeps=3, **PLAIN
        ),
        "experts Galerkin, no coarse solve, 10 sweeps, colour by colour (K=16)": (
            lambda r: MoEConstraint(r, metis(experts=16), coarse=False, sweeps=10, **PLAIN)
        ),
    }


def _newton_variants():
    """For a residual that is not affine: the experts each solving their nonlinear
    problem by Newton's method (K = 16 and 64), beside the default, the linearisation
    at the coarse solution (K = 16 here; K = 64 is the 3-sweep colour-by-colour row
    of :func:`_variants`)."""
    variants = {
        "two-level Galerkin, 3 sweeps, colour by colour (K=16)": lambda r: MoEConstraint(
            r, MetisPartition(experts=16), sweeps=3, **PLAIN
        )
    }
    for k in (16, 64):
        name = f"two-level Galerkin, 3 sweeps, colour by colour, experts by Newton (K={k})"
        variants[name] = lambda r, k=k: MoEConstraint(
            r, MetisPartition(experts=k), sweeps=3, nonlinear="newton", **PLAIN
        )
    return variants


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=65, help="vertices a side")
    parser.add_argument("--basis", type=int, nargs="+", default=[16, 32], help="N")
    parser.add_argument("--guess", type=float, default=0.0565, help="the guess's error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pde", default="darcy", choices=["darcy", "nonlinear_diffusion"])
    args = parser.parse_args(argv)
    space, residual, inputs, u, guess, coordinates, loss = _case(
        args.pde, args.resolution, args.guess, args.seed
    )
    before = loss(guess[:, None], u[:, None]).item()
    print(
        f"# {platform.machine()}, torch {torch.__version__}; {args.pde} {args.resolution} x "
        f"{args.resolution} P1, {space.n_dofs} DOFs; guess at {100 * before:.2f} %"
    )
    print("| formulation | " + " | ".join(f"N = {n}: error, ms" for n in args.basis) + " |")
    print("|---|" + "---:|" * len(args.basis))
    results = {}
    variants = _variants()
    if not getattr(residual, "affine", False):
        variants |= _newton_variants()
    for name, make in variants.items():
        layer = make(residual)
        cells = []
        for n_basis in args.basis:
            basis = _basis(guess, coordinates, n_basis)
            start = time.perf_counter()
            with torch.no_grad():
                out = layer(guess[:, None], basis, **inputs)
            seconds = time.perf_counter() - start
            error = loss(out, u[:, None]).item()
            report = layer.report
            results[(name, n_basis)] = {
                "error": error,
                "seconds": seconds,
                "converged": bool(report["converged"].all()),
                "singular": int(report["singular"].sum()),
            }
            flag = "" if report["converged"].all() else " (failed)"
            if not residual.affine:  # Newton's iterations, summed over the solves
                flag += f" [{int(report['iterations'][0])} it]"
            cells.append(f"{100 * error:.3f} %{flag}, {1000 * seconds:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
