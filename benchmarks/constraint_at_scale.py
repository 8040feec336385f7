"""Where a trained network's error is on a large mesh, and what removes it.

An unconstrained FEOperator (FNO, 12 modes, 32 channels, on a fixed 64 x 64 grid,
the user's natural choice) is trained on fenop's Darcy data at R x R P1 for
``--seconds`` of wall clock (as ``benchmarks/hard_constraints.py accuracy`` trains),
and its outputs ``g`` on held-out samples are taken apart and corrected:

- **split**: the error ``e = u - g`` as its energy projection onto the P1 space of
  the nested (R + 1) / 2 mesh (the scales a 64 x 64 grid can carry) and the rest;
- **smoothing**: ``ν`` sweeps of damped Jacobi on the FE system itself,
  ``u ← u - ω D⁻¹ R(u)`` (ω = 2/3), the smoother of a multigrid: linear cost, no
  factorisation; and ``ν`` steps of Chebyshev smoothing of the same cost (one
  product with ``J`` each), the polynomial in ``D⁻¹ J`` smallest on the upper part
  ``[λ / 10, λ]`` or ``[λ / 30, λ]`` of its spectrum (``λ`` Gershgorin's bound);
- **coarse oracle**: ``g`` plus the coarse part of its error exactly (what the best
  basis a 64 x 64 grid can emit would give a Galerkin solve), then ``ν`` sweeps;
- **Galerkin**: a global Galerkin solve in the span of 16 fields made from ``g``
  (its products with ``x^i y^j``, i, j < 4), then ``ν`` sweeps, and the same
  with ``ν`` sweeps before it too (a two-grid cycle whose coarse space is the
  basis);
- **coarse G**: a Galerkin correction in the span of a G x G grid's bilinear hat
  functions interpolated at the mesh's DOFs (zero on its Dirichlet DOFs), a fixed
  space that needs nothing from the network (its sparse matrix ``Pᵀ J P`` formed,
  factorised and solved per sample), then ``ν`` sweeps; with ``ν`` sweeps before it
  too (a two-grid cycle from the network's output; also with Chebyshev steps); and
  with the 16 fields above, one solve after the other or beside the coarse space in
  one solve.

Each row gives the relative L2 and H1 errors against the FE solution, averaged
over the test samples, and the time per sample of the correction (float64, CPU),
beside scikit-fem's assembly and direct solve of one sample.

    python benchmarks/constraint_at_scale.py --resolution 129 --seconds 150
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from safetensors.torch import load_file, save_file

from fenop.data import FieldDataset, generate
from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, unit_square
from fenop.fem.jacobian import JacobianPattern
from fenop.operators import FNO, FEOperator
from fenop.operators.constraints.coarse import grid_hats

sys.path.insert(0, str(Path(__file__).parent))
from hard_constraints import _train_for

OMEGA = 2 / 3
# Chebyshev smoothing's intervals, [λ / ratio, λ] of D⁻¹ J's spectrum
CHEBYSHEV = (10, 30)


def _errors(space, u, v) -> tuple[float, float]:
    """Relative L2 and H1 errors of ``v`` against ``u`` ``(n,)`` in the FE norms."""
    mass, stiffness = space.mass_matrix, space.stiffness_matrix
    e = u - v
    l2 = np.sqrt(e @ mass @ e / (u @ mass @ u))
    h1 = np.sqrt(e @ (mass + stiffness) @ e / (u @ (mass + stiffness) @ u))
    return float(l2), float(h1)


class _System:
    """One sample's FE system ``R(u) = J u + R(0)`` (Dirichlet rows the identity)."""

    def __init__(self, residual, pattern, a: torch.Tensor):
        values = residual.jacobian_entries(pattern, a=a[None])
        self.r0 = residual.offset(a=a[None])[0].numpy()
        dense_rows = pattern.entry_rows.numpy()
        cols = pattern.pattern.col.numpy()
        n = pattern.space.n_dofs
        self.matrix = scipy.sparse.csr_array((values[0].numpy(), (dense_rows, cols)), shape=(n, n))
        self.diagonal = self.matrix.diagonal()
        self.free = ~residual.dirichlet.numpy()

    def residual(self, u):
        return self.matrix @ u + self.r0

    def jacobi(self, u, sweeps: int):
        for _ in range(sweeps):
            u = u - OMEGA * np.where(self.free, self.residual(u) / self.diagonal, 0.0)
        return u

    def chebyshev(self, u, sweeps: int, ratio: float):
        """``sweeps`` steps of Chebyshev smoothing on ``D⁻¹ J`` (one product with ``J``
        each, as a Jacobi sweep): the polynomial smallest on ``[λ / ratio, λ]``, ``λ``
        Gershgorin's bound on ``D⁻¹ J``'s spectrum over the free rows."""
        dinv = np.where(self.free, 1 / self.diagonal, 0.0)
        rows = np.abs(self.matrix) @ np.ones(len(u))
        top = float(np.max(np.where(self.free, rows * np.abs(dinv), 0.0)))
        theta, delta = (top + top / ratio) / 2, (top - top / ratio) / 2
        sigma = theta / delta
        rho = 1 / sigma
        r = -self.residual(u)
        d = dinv * r / theta
        for k in range(sweeps):
            u = u + d
            if k == sweeps - 1:
                break
            r = r - self.matrix @ d
            rho, previous = 1 / (2 * sigma - rho), rho
            d = rho * previous * d + 2 * rho / delta * dinv * r
        return u

    def galerkin(self, u, basis):
        """``u + Φᵀ w`` with ``Φ (J (u + Φᵀ w) + R(0)) = 0``, ``basis`` ``(N, n)``."""
        phi = np.where(self.free, basis, 0.0)
        matrix = phi @ (self.matrix @ phi.T)
        w = np.linalg.lstsq(matrix, -phi @ self.residual(u), rcond=1e-12)[0]
        return u + w @ phi


def _coarse_galerkin(system, prolongation, u, basis=None):
    """``u`` plus the Galerkin correction in the span of ``prolongation``'s columns
    ``(n, m)`` (and ``basis`` ``(N, n)``'s fields beside them, a dense solve):
    ``Pᵀ R(u + P c) = 0``."""
    free, p = system.free, prolongation
    if basis is not None:
        p = np.hstack([p.toarray(), np.where(free, basis, 0.0).T])
        c = np.linalg.solve(p.T @ (system.matrix @ p), -p.T @ system.residual(u))
    else:
        matrix = scipy.sparse.csc_array(p.T @ system.matrix @ p)
        c = scipy.sparse.linalg.splu(matrix).solve(-p.T @ system.residual(u))
    return u + p @ c


def _coarse_split(system, prolongation, e):
    """The energy projection of ``e`` onto the coarse space (``prolongation`` ``(n, m)``,
    free DOFs only) and the rest."""
    free = system.free
    k = system.matrix[free][:, free]
    p = prolongation[free]
    c = scipy.sparse.linalg.spsolve(scipy.sparse.csc_array(p.T @ k @ p), p.T @ (k @ e[free]))
    coarse = np.zeros_like(e)
    coarse[free] = p @ c
    return coarse, e - coarse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=129)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--samples", type=int, nargs=2, default=[250, 40])
    parser.add_argument("--measured", type=int, default=8, help="test samples taken apart")
    parser.add_argument("--data", type=Path, default=Path("runs/constraint_at_scale"))
    args = parser.parse_args(argv)
    n_train, n_test = args.samples
    args.data.mkdir(parents=True, exist_ok=True)
    path = generate(
        "darcy",
        n_train + n_test,
        unit_square(args.resolution),
        seed=0,
        path=args.data / f"darcy_{args.resolution}_{n_train + n_test}.h5",
        workers=2,
        progress=False,
    )
    train = FieldDataset(path, inputs=["a"], indices=range(n_train))
    test = FieldDataset(path, inputs=["a"], indices=range(n_train, n_train + n_test))
    space = train.space
    stats = dict(zip(("input_stats", "output_stats"), train.normalizers(), strict=True))
    x_train, y_train = (
        torch.stack(t) for t in zip(*(train[i] for i in range(n_train)), strict=True)
    )
    torch.manual_seed(0)
    model = FEOperator(
        space, space, FNO(4, 1, n_modes=(12, 12), hidden_channels=32), resolution=64, **stats
    )
    # the trained weights are kept beside the data: a second run takes them apart again
    weights = args.data / f"fno_{args.resolution}_{args.seconds:g}s.safetensors"
    if weights.exists():
        model.load_state_dict(load_file(weights))
        run = json.loads(weights.with_suffix(".json").read_text())
        steps, seconds = run["steps"], run["seconds"]
    else:
        steps, seconds = _train_for(
            model, x_train, y_train, seconds=args.seconds, batch=8, physics=None, weight=0.0
        )
        # tensors only: neuraloperator adds its constructor arguments as "_metadata"
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        save_file(state, weights)
        weights.with_suffix(".json").write_text(json.dumps({"steps": steps, "seconds": seconds}))
    model.eval()

    family = get_pde("darcy")(space)
    residual = family.residual()
    pattern = JacobianPattern(space)
    coarse_space = FunctionSpace(unit_square((args.resolution + 1) // 2), dirichlet="boundary")
    # the coarse hat functions that vanish on the boundary, at the fine DOFs
    coarse_free = np.setdiff1d(np.arange(coarse_space.n_dofs), coarse_space.boundary_dofs)
    prolongation = coarse_space.evaluation_matrix(space.dof_points)[0][:, coarse_free]
    # the layers' coarse spaces (coarse_grid = G): a grid's hat functions at the DOFs
    free = ~residual.dirichlet
    prolongations = {size: grid_hats(space, free, size)[0] for size in (9, 17, 33, 65)}
    x, y = space.dof_points.T
    sweeps = (1, 2, 4, 8)
    rows: dict[str, list] = {}

    def record(name, v, u, elapsed=None):
        rows.setdefault(name, []).append((*_errors(space, u, v), elapsed))

    solve_times = []
    for i in range(args.measured):
        a, u = test[i]
        with torch.no_grad():
            g = model(a[None]).double()[0, 0].numpy()
        u = u[0].double().numpy()
        begin = time.perf_counter()
        family.solve(a=a[0].double().numpy())
        solve_times.append(time.perf_counter() - begin)
        system = _System(residual, pattern, a[0].double())
        record("unconstrained", g, u)
        coarse, fine = _coarse_split(system, prolongation, u - g)
        record("  its error's coarse part alone", u - coarse, u)
        record("  its error's fine part alone", u - fine, u)
        for nu in sweeps:
            begin = time.perf_counter()
            v = system.jacobi(g, nu)
            record(f"Jacobi, {nu} sweeps", v, u, time.perf_counter() - begin)
        for ratio in CHEBYSHEV:
            for nu in sweeps:
                begin = time.perf_counter()
                v = system.chebyshev(g, nu, ratio)
                record(f"Chebyshev 1/{ratio}, {nu} sweeps", v, u, time.perf_counter() - begin)
        for nu in (0, *sweeps):
            record(f"coarse oracle, then {nu} sweeps", system.jacobi(g + coarse, nu), u)
        basis = np.stack([g * x**p * y**q for p in range(4) for q in range(4)])
        for nu in (0, *sweeps):
            begin = time.perf_counter()
            v = system.jacobi(system.galerkin(g, basis), nu)
            record(f"Galerkin N=16, then {nu} sweeps", v, u, time.perf_counter() - begin)
        for nu in sweeps:
            v = system.galerkin(system.jacobi(g, nu), basis)
            record(f"{nu} sweeps, then Galerkin N=16", v, u)
        for nu in (1, 2, 4):
            begin = time.perf_counter()
            v = system.jacobi(system.galerkin(system.jacobi(g, nu), basis), nu)
            record(f"{nu} sweeps, Galerkin N=16, {nu} sweeps", v, u, time.perf_counter() - begin)

        for size, p in prolongations.items():
            m = p.shape[1]
            for nu in (0, 2, 4):
                begin = time.perf_counter()
                v = system.jacobi(_coarse_galerkin(system, p, g), nu)
                record(
                    f"coarse {size} ({m} DOFs), then {nu} sweeps", v, u, time.perf_counter() - begin
                )
            for nu in (1, 2, 4):
                begin = time.perf_counter()
                v = system.jacobi(_coarse_galerkin(system, p, system.jacobi(g, nu)), nu)
                record(
                    f"{nu} sweeps, coarse {size}, {nu} sweeps", v, u, time.perf_counter() - begin
                )
                for ratio in CHEBYSHEV:
                    v = system.chebyshev(g, nu, ratio)
                    v = system.chebyshev(_coarse_galerkin(system, p, v), nu, ratio)
                    record(f"{nu} Chebyshev 1/{ratio}, coarse {size}, the same", v, u)
            v = system.galerkin(_coarse_galerkin(system, p, g), basis)
            record(f"coarse {size}, Galerkin N=16, then 4 sweeps", system.jacobi(v, 4), u)
            v = _coarse_galerkin(system, p, system.galerkin(g, basis))
            record(f"Galerkin N=16, coarse {size}, then 4 sweeps", system.jacobi(v, 4), u)
            if m <= 1000:
                begin = time.perf_counter()
                v = system.jacobi(_coarse_galerkin(system, p, g, basis), 4)
                elapsed = time.perf_counter() - begin
                record(f"coarse {size} and Galerkin N=16, then 4 sweeps", v, u, elapsed)

    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"darcy {args.resolution} x {args.resolution} P1, {space.n_dofs} DOFs; FNO 64 x 64 "
        f"trained {seconds:.0f} s ({steps} steps, batch 8, {n_train} samples); "
        f"{args.measured} test samples; scikit-fem solve "
        f"{1000 * np.median(solve_times):.1f} ms / sample"
    )
    print("| output | rel. L2 | rel. H1 | correction (ms / sample) |")
    print("|---|---:|---:|---:|")
    for name, values in rows.items():
        l2, h1 = (np.mean([v[k] for v in values]) for k in (0, 1))
        times = [v[2] for v in values if v[2] is not None]
        cost = f"{1000 * np.median(times):.1f}" if times else "-"
        print(f"| {name} | {l2:.4f} | {h1:.4f} | {cost} |")


if __name__ == "__main__":
    main()
