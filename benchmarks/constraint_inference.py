"""A constrained model's inference against the FE solves it replaces, as the mesh grows.

Darcy (the FNO paper's coefficients, unit load) on ``unit_square(R)``, per sample:

- scikit-fem: the assembly of ``K(a)`` and the sparse direct solve of fenop's data
  generation (SuperLU, reverse Cuthill-McKee and minimum degree);
- pyamg: the same assembly, a smoothed-aggregation AMG hierarchy built for the
  sample (its coefficient is new) and conjugate gradients preconditioned by it, to
  a relative residual of ``--tol``; its error against the direct solve is printed;
- FEOperator forwards without gradients, batch ``--batch``: an FNO on a fixed 64 x 64
  grid (12 modes, 32 channels; untrained: for an affine residual the constraint's
  work does not depend on the weights), unconstrained and under each constraint
  variant, with the layers' defaults (4 Jacobi sweeps and the grid of
  ``coarse_grid="auto"`` around the solves) and, "alone", without them.

Each figure is the median over ``--rounds`` rounds, in ms per sample; "x faster"
divides the faster FE solve's time by the model's.

    python benchmarks/constraint_inference.py
    python benchmarks/constraint_inference.py --resolutions 65 --samples 2 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from fenop._allocator import keep_freed_memory
from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, unit_square
from fenop.operators import FNO, FEOperator, HardConstraint, MoEConstraint

ALONE = {"smoothing": 0, "coarse_grid": 0}
# name: (basis fields, the layer on a residual); None: unconstrained
VARIANTS = {
    "unconstrained": (0, None),
    "global N=8": (8, lambda r: HardConstraint(r)),
    "global N=8, alone": (8, lambda r: HardConstraint(r, **ALONE)),
    "global N=32": (32, lambda r: HardConstraint(r)),
    "MoE K=64 N=16": (16, lambda r: MoEConstraint(r, MetisPartition(experts=64))),
    "MoE K=64 N=16, alone": (16, lambda r: MoEConstraint(r, MetisPartition(experts=64), **ALONE)),
}


def _median_time(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _amg_solve(family, a: np.ndarray, tol: float) -> np.ndarray:
    import pyamg

    free = family.interior
    matrix = scipy.sparse.csr_array(family._stiffness(a))[free][:, free]
    hierarchy = pyamg.smoothed_aggregation_solver(scipy.sparse.csr_matrix(matrix))
    u = np.zeros(family.space.n_dofs)
    u[free] = hierarchy.solve(family._load[free], tol=tol, accel="cg")
    return u


def _model(space, variant: str, residual, stats) -> FEOperator:
    n_basis, make = VARIANTS[variant]
    torch.manual_seed(0)
    extra = {"constraint": make(residual), "constraint_inputs": ("a",)} if make else {}
    processor = FNO(4, 1 + n_basis, n_modes=(12, 12), hidden_channels=32)
    return FEOperator(space, space, processor, resolution=64, **stats, **extra).eval()


def _resolution(n: int, args) -> dict:
    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    family = get_pde("darcy")(space)
    rng = np.random.default_rng(0)
    inputs = [family.sample_inputs(rng)["a"] for _ in range(args.samples)]
    direct = [family.solve(a=a)["u"] for a in inputs]  # also warms the ordering up
    times = {
        "scikit-fem": _median_time(lambda: [family.solve(a=a) for a in inputs], args.rounds)
        / args.samples
    }
    error = None
    try:
        amg = [_amg_solve(family, a, args.tol) for a in inputs]
    except ImportError:
        print("pyamg is not installed (pip install pyamg): its column is left out")
    else:
        error = max(
            np.linalg.norm(v - u) / np.linalg.norm(u) for u, v in zip(direct, amg, strict=True)
        )
        print(f"R = {n}: pyamg's relative error against the direct solve {error:.1e}")
        times["pyamg"] = (
            _median_time(lambda: [_amg_solve(family, a, args.tol) for a in inputs], args.rounds)
            / args.samples
        )
    x = torch.from_numpy(np.stack(inputs))[:, None].float()
    y = torch.from_numpy(np.stack(direct))[:, None].float()
    # the data's statistics, so that the network's outputs have the solution's size
    stats = {
        "input_stats": ([x.mean().item()], [x.std().item()]),
        "output_stats": ([y.mean().item()], [y.std().item()]),
    }
    residual = family.residual()
    batches = x.split(args.batch)
    for variant in args.variants:
        model = _model(space, variant, residual, stats)
        with torch.no_grad():
            model(batches[0])  # first-use work: the constraint's checks, the sparse indices

            def run(model=model):
                with torch.no_grad():
                    for batch in batches:
                        model(batch)

            times[variant] = _median_time(run, args.rounds) / args.samples
        report = getattr(model.constraint, "report", None)
        if report is not None and not bool(report["converged"].all()):
            print(f"R = {n}, {variant}: some solves failed")
    return {"dofs": space.n_dofs, "times": times, "amg_error": error}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[129, 257])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-8, help="pyamg's relative residual")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc returning freed memory to the system (fenop's command keeps it)",
    )
    args = parser.parse_args(argv)
    kept = not args.default_allocator and keep_freed_memory()
    print(
        f"Darcy, {args.samples} samples, batch {args.batch}, median of {args.rounds} rounds; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, "
        + ("glibc keeping freed memory" if kept else "the default allocator")
    )
    results = {n: _resolution(n, args) for n in args.resolutions}
    solvers = [s for s in ("scikit-fem", "pyamg") if s in results[args.resolutions[0]]["times"]]
    header = ["R", "DOFs", *(f"{s} (ms)" for s in solvers)]
    for variant in args.variants:
        header += [f"{variant} (ms)", "x faster"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    for n, result in results.items():
        times = result["times"]
        fastest = min(times[s] for s in solvers)
        row = [str(n), f"{result['dofs']:,}".replace(",", " ")]
        row += [f"{1e3 * times[s]:.1f}" for s in solvers]
        for variant in args.variants:
            row += [f"{1e3 * times[variant]:.1f}", f"{fastest / times[variant]:.1f}"]
        print("| " + " | ".join(row) + " |")
    return results


if __name__ == "__main__":
    main()
