"""Hard constraints: outputs that satisfy the discrete PDE in a Galerkin (or least-squares) sense.

A network emits a prediction ``g`` and ``N`` basis fields ``Φ`` (zero on the
Dirichlet DOFs); the constrained output is ``u = g + Φ w`` with coefficients ``w``
that make the FE residual ``R(u; inputs)`` vanish against the basis:

- ``condition="galerkin"`` (default): ``Φᵀ R(g + Φ w) = 0``, the residual orthogonal
  to the basis. For an elliptic problem this is the energy-norm best fit in the
  span (Céa's lemma), and it is the more accurate of the two at the same cost
  (BENCHMARKS.md, "Hard constraints: the formulations on one sample").
- ``condition="least_squares"``: ``min_w |R(g + Φ w)|²``, the objective of
  Chalapathi et al. (ICLR 2024), which weights the error towards high frequencies.

:class:`HardConstraint` solves once over the whole domain. :class:`MoEConstraint`
splits the DOFs into subdomains (:mod:`fenop.fem.partition`) and lets each
"expert" solve for its own ``N`` coefficients on its extended set with the field
outside held at the current values, a few sweeps after an optional global solve
(the coarse level); each DOF then takes its owner's value. Gradients flow through
the solves: for a residual affine in ``u`` (Darcy, Poisson, a heat step) the solve
is exact, and autograd through it is the implicit gradient.

By default both layers put their solves inside a two-grid cycle from the network's
output: 4 sweeps of damped Jacobi on the FE system (``smoothing``), the solves, a
Galerkin correction in the hat functions of a coarse grid sized by the mesh
(``coarse_grid="auto"``, :mod:`.coarse`), 4 sweeps. It removes what a basis
emitted on a grid coarser than the mesh cannot carry (BENCHMARKS.md measures it);
the output's residual is then orthogonal to the grid's hats rather than to the
basis. ``smoothing=0, coarse_grid=0`` leave the condition alone.

For a residual that is not affine in ``u`` (nonlinear diffusion) the global solve is
Newton's method on the ``N`` unknowns (Levenberg-Marquardt for least squares), with a
fixed iteration cap, per-problem convergence masks and no host synchronisation in
the loop; its backward pass is the implicit function theorem's with the exact
Jacobian (:mod:`fenop.operators.implicit`), in memory that does not grow with the
iterations. The experts' sweeps then solve the residual's linearisation at the
coarse solution (one Newton step of the two-level iteration, as cheap as an affine
residual's sweeps), or, ``nonlinear="newton"``, each expert its own nonlinear
problem the same way as the global solve.

The residual is a black box ``R(u, **inputs)``: its Jacobian is recovered on the
FE pattern from one linearisation per colour of the pattern's columns
(:class:`~fenop.fem.jacobian.JacobianPattern`, about 9 for P1 triangles), once per
call for an affine residual and once per Newton iteration otherwise, unless the
residual assembles it itself (``jacobian_entries`` for an affine residual,
``linearised`` for another: one pass instead of one per colour); every product
after that is sparse, each expert's with its own block of ``J``, so the layer's
cost and memory grow linearly with the mesh (BENCHMARKS.md).

Every solve is a small dense float64 system, symmetrically scaled to a unit
diagonal, with a small ridge; Cholesky where it is symmetric, LU otherwise. The
Jacobi sweeps around the solves run in the output's precision. Its
condition number is monitored: ``report`` says, per sample, whether every solve
succeeded, how many systems were numerically singular (basis fields dependent on
an expert's patch: the ridge then picks the coefficients), how many sweeps ran,
and the residual norm of the output.

The modules, in the order a reader meets them: :mod:`.residual` (what a layer
needs of a residual), :mod:`.conditions` (Galerkin, least squares),
:mod:`.factorisation` (the dense solves), :mod:`.roots` (Newton, chord,
Levenberg-Marquardt), :mod:`.fields` (the experts' index sets and contractions),
:mod:`.coarse` (a coarse grid's hat functions), :mod:`.layer` (what both layers
share), :mod:`.galerkin` (the global affine solve),
:mod:`.sweeps` (the experts' sweeps), :mod:`.hard` and :mod:`.experts` (the two
layers).

>>> import torch
>>> from fenop.data.pdes import get_pde
>>> from fenop.fem import FunctionSpace, MetisPartition, unit_square
>>> space = FunctionSpace(unit_square(17), dirichlet="boundary")
>>> darcy = get_pde("darcy")(space)
>>> sample = darcy.sample(0, 0)
>>> a, u = (torch.from_numpy(sample[k])[None] for k in ("a", "u"))
>>> basis = torch.stack([u[0], space.interpolate(lambda x: x[0] * (1 - x[0]) * x[1])])[None]
>>> # the condition alone: with the solution in the basis, the output is the solution
>>> moe = MoEConstraint(
...     darcy.residual(), MetisPartition(experts=4), sweeps=2, smoothing=0, coarse_grid=0
... )
>>> out = moe(torch.zeros_like(u)[:, None], basis, a=a)
>>> bool(((out[:, 0] - u).norm() / u.norm()) < 1e-8), moe.report["converged"].tolist()
(True, [True])
"""

from fenop.operators.constraints.common import (
    CONDITIONS,
    GLOBAL_SOLVES,
    NONLINEAR,
    UPDATE_ALIASES,
    UPDATES,
    Condition,
    GlobalSolve,
    Nonlinear,
    Update,
    free_dofs,
)
from fenop.operators.constraints.experts import MoEConstraint
from fenop.operators.constraints.hard import HardConstraint
from fenop.operators.constraints.residual import AssembledJacobian, Residual

__all__ = [
    "CONDITIONS",
    "GLOBAL_SOLVES",
    "NONLINEAR",
    "UPDATES",
    "UPDATE_ALIASES",
    "AssembledJacobian",
    "Condition",
    "GlobalSolve",
    "HardConstraint",
    "MoEConstraint",
    "Nonlinear",
    "Residual",
    "Update",
    "free_dofs",
]
