"""Your own PDE: a model hard-constrained by a residual that fenop does not ship.

-Δu + c u³ = f on the unit square, u = 0 on the boundary (a cubic reaction, c = 10):

1. The residual, written as a user writes one: a ``DirichletResidual`` whose weak
   form ``∫ ∇u·∇v + c u³ v - f v`` is assembled in torch by the FE forms.
2. Data from an independent solver: Newton's method on scikit-fem's assembly,
   written to a store; the residual is checked to vanish at its solutions.
3. A model (MgNO in an FEOperator) that also emits basis fields, and a
   ``HardConstraint`` of that residual, which makes its output satisfy the discrete
   PDE in their span (Galerkin: Φᵀ R(u) = 0, by Newton's method on the N
   coefficients, gradients by the implicit function theorem), trained by the Trainer.
4. The test error, and the Galerkin condition at the model's output.

    python examples/own_pde.py            # about two minutes on 2 CPU cores
    python examples/own_pde.py --quick    # a few seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.data import FieldDataset
from fenop.data.grf import GaussianRandomField
from fenop.data.pdes import DirichletResidual
from fenop.data.store import create_store, write_samples
from fenop.fem import FunctionSpace, RelativeL2Loss, unit_square
from fenop.operators import FEOperator, HardConstraint, MgNO
from fenop.train import Trainer


class CubicReaction(DirichletResidual):
    """``R(u; f) = ∫ ∇u·∇v + c u³ v - f v`` at the free DOFs, ``u`` at the Dirichlet
    DOFs (the base class's part). Not affine in ``u``: a hard constraint solves it by
    Newton's method. Shapes: ``u``, ``f`` ``(..., n_dofs)`` -> ``(..., n_dofs)``."""

    def __init__(self, space: FunctionSpace, c: float):
        super().__init__(space)
        self.c = c

    def weak_form(self, u: torch.Tensor, *, f: torch.Tensor) -> torch.Tensor:
        forms = self.forms  # values and gradients at the quadrature points, assembly
        u_q = forms.values(u)
        reaction = self.c * u_q**3 - forms.values(f)
        return forms.assemble_gradient(forms.gradients(u)) + forms.assemble_values(reaction)


def solve(space: FunctionSpace, f: np.ndarray, c: float) -> np.ndarray:
    """The FE solution for the load ``f`` (DOF values): Newton's method on
    scikit-fem's assembly, independent of the torch residual above."""

    @skfem.BilinearForm
    def jacobian(du, v, w):
        return dot(grad(du), grad(v)) + 3 * c * w["u"] ** 2 * du * v

    @skfem.LinearForm
    def residual(v, w):
        return dot(grad(w["u"]), grad(v)) + c * w["u"] ** 3 * v - w["f"] * v

    basis, u = space.basis, np.zeros(space.n_dofs)
    for _ in range(30):
        fields = {"u": basis.interpolate(u), "f": basis.interpolate(f)}
        step = skfem.solve(
            *skfem.condense(
                jacobian.assemble(basis, **fields),
                -residual.assemble(basis, **fields),
                D=space.boundary_dofs,
            )
        )
        u = u + step
        if np.linalg.norm(step) <= 1e-12 * (1 + np.linalg.norm(u)):
            return u
    raise RuntimeError("Newton's method did not converge")


def make_data(path: Path, space: FunctionSpace, n_samples: int, c: float) -> Path:
    """A store of loads ``f`` (smooth random fields) and their solutions ``u``."""
    grf = GaussianRandomField([0.0, 0.0], [1.0, 1.0], sigma=20.0)
    at_dofs = grf.at(space.dof_points)
    rng = np.random.default_rng(0)
    f = np.stack([at_dofs(grf.coefficients(rng)) for _ in range(n_samples)])
    u = np.stack([solve(space, load, c) for load in f])
    create_store(path, space, fields=["f", "u"], n_samples=n_samples, attrs={"pde": "cubic"})
    write_samples(path, 0, {"f": f, "u": u})
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    args = parser.parse_args(argv)
    n, n_train, n_test, epochs, n_basis = (17, 24, 8, 3, 4) if args.quick else (33, 300, 50, 30, 16)
    c = 10.0
    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    residual = CubicReaction(space, c)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        path = make_data(Path(folder) / "cubic.h5", space, n_train + n_test, c)
        train = FieldDataset(path, inputs=["f"], indices=range(n_train))
        test = FieldDataset(path, inputs=["f"], indices=range(n_train, n_train + n_test))

        # The residual against the independent solver: zero at its solutions.
        exact = FieldDataset(path, inputs=["f"], indices=test.indices, dtype=torch.float64)
        f, u = (torch.stack([exact[i][k][0] for i in range(len(exact))]) for k in (0, 1))
        free = ~residual.dirichlet
        at_solution = residual(u, f=f)[:, free].norm() / residual(0 * u, f=f)[:, free].norm()
        print(f"residual at scikit-fem's solutions: {at_solution:.1e} (relative)")

        f_stats, u_stats = train.normalizers()
        model = FEOperator(
            space,
            space,
            MgNO(4, 1 + n_basis, grid=(n, n), width=16, n_layers=2),  # u and N basis fields
            resolution=n,
            input_stats=f_stats,
            output_stats=u_stats,
            # the Galerkin condition alone, solved by Newton's method, which the
            # output then meets exactly (the defaults, the cycle of Jacobi sweeps and
            # a coarse grid around one Newton step from the prediction, are more
            # accurate on larger meshes but leave Φᵀ R(u) nonzero)
            constraint=HardConstraint(residual, smoothing=0, coarse_grid=0, global_solve="newton"),
            constraint_inputs=("f",),  # the residual's name for each input channel
        )
        Trainer(model, train, test, epochs=epochs, batch_size=8, lr=3e-3, progress=False).fit()

        # The basis the network emits, seen by a hook on the constraint layer.
        seen = {}
        model.constraint.register_forward_hook(
            lambda layer, inputs, output: seen.update(basis=inputs[1].double())
        )
        model.eval()
        with torch.no_grad():
            x = torch.stack([test[i][0] for i in range(len(test))])
            prediction = model(x).double()
        r = residual(prediction[:, 0], f=f)
        galerkin = torch.einsum("bkn,bn->bk", seen["basis"], r).norm(dim=1)
        scale = seen["basis"].norm(dim=(1, 2)) * residual(0 * u, f=f).norm(dim=1)
        error = RelativeL2Loss(space)(prediction.float(), u[:, None].float()).item()
        condition = (galerkin / scale).max().item()
        print(f"test relative L2 error {error:.4f}; Galerkin condition |Φᵀ R(u)| {condition:.1e}")
        return {
            "residual_at_solution": at_solution.item(),
            "galerkin": condition,
            "converged": bool(model.constraint.report["converged"].all()),
            "test_error": error,
        }


if __name__ == "__main__":
    main()
