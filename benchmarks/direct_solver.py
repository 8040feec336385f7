"""Sparse direct solves of the Darcy system: which fill-reducing ordering, on which numbering.

fenop's data generation solves each sample's FE system with SuperLU. This compares,
on the same matrices, SuperLU's COLAMD (its default), its minimum degree on A^T + A
(MMD) alone, and MMD after a reverse Cuthill-McKee renumbering (what
`PDEFamily.solve_linear` does), on two numberings of the same vertices: the
structured `unit_square(R)` and the uniformly refined mesh of `hierarchy`
(what FEMultigrid trains on). Each figure is the fastest of `--repeats` solves.

    python benchmarks/direct_solver.py
    python benchmarks/direct_solver.py --resolutions 85 --repeats 2     # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from scipy.sparse.csgraph import reverse_cuthill_mckee

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, hierarchy, unit_square


def _system(space: FunctionSpace) -> tuple[scipy.sparse.csc_array, np.ndarray]:
    darcy = get_pde("darcy")(space)
    a = darcy.sample_inputs(np.random.default_rng(0))["a"]
    free = darcy.interior
    matrix = scipy.sparse.csc_array(darcy._stiffness(a))[free][:, free]
    return matrix, np.ones(len(free))


def _fastest(matrix, load, spec: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scipy.sparse.linalg.spsolve(matrix, load, permc_spec=spec)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[85, 129, 257])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-slow",
        type=float,
        default=5.0,
        help="seconds: an ordering slower than this on a mesh is not repeated, and not run "
        "on that kind of mesh at larger resolutions",
    )
    args = parser.parse_args(argv)
    print(f"direct_solver: Darcy, P1, fastest of {args.repeats} SuperLU solves (ms)")
    columns = ("mesh", "R", "unknowns", "COLAMD", "MMD", "RCM + MMD")
    print(" ".join(f"{c:>10}" for c in columns))
    results, too_slow = {}, set()
    for n in sorted(args.resolutions):
        if (n - 1) % 4:
            raise SystemExit(f"--resolutions must be 4k + 1, got {n}")
        meshes = {
            "structured": FunctionSpace(unit_square(n), dirichlet="boundary"),
            "refined": hierarchy(unit_square((n - 1) // 4 + 1), 3, dirichlet="boundary")[-1],
        }
        for label, space in meshes.items():
            matrix, load = _system(space)
            order = reverse_cuthill_mckee(scipy.sparse.csr_array(matrix), symmetric_mode=True)
            renumbered = scipy.sparse.csc_array(matrix[order][:, order])
            row = {}
            for name, m, spec in (
                ("COLAMD", matrix, "COLAMD"),
                ("MMD", matrix, "MMD_AT_PLUS_A"),
                ("RCM + MMD", renumbered, "MMD_AT_PLUS_A"),
            ):
                if (label, name) in too_slow:
                    row[name] = float("nan")
                    continue
                row[name] = _fastest(m, load, spec, 1)
                if row[name] > args.skip_slow:
                    too_slow.add((label, name))
                elif args.repeats > 1:
                    row[name] = min(row[name], _fastest(m, load, spec, args.repeats - 1))
            results[(label, n)] = row
            cells = " ".join(
                f"{'skipped':>10}" if np.isnan(row[k]) else f"{1e3 * row[k]:>10.1f}"
                for k in ("COLAMD", "MMD", "RCM + MMD")
            )
            print(f"{label:>10} {n:>10} {len(load):>10} {cells}", flush=True)
    return results


if __name__ == "__main__":
    main()
