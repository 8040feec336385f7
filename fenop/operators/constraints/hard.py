"""HardConstraint: one solve over the whole domain."""

from __future__ import annotations

from fenop.operators.constraints.layer import _Constraint


class HardConstraint(_Constraint):
    """The output ``g + Φ w`` whose residual vanishes against the basis on the whole domain.

    Args:
        residual: a module ``R(u, **inputs)`` on ``(..., n_dofs)`` tensors with the
            members of :class:`~fenop.operators.constraints.Residual` (its forms and
            space, Dirichlet DOFs, whether it is affine and symmetric), such as
            ``PDEFamily.residual()``; ``affine = True`` on it makes one linear solve
            exact, else Newton's method solves.
        condition: ``"galerkin"`` or ``"least_squares"`` (for a residual that is not
            affine, Levenberg-Marquardt iterations: a step that raises ``|R|²`` is
            refused and the damping raised tenfold, an accepted one lowers it tenfold).
        ridge: added to the unit diagonal of each scaled system.
        max_iterations, tolerance: Newton's, for residuals that are not affine: a
            solve has converged when its condition has fallen below ``tolerance``
            times its scale (the test fields' norm times that of the residual of
            the zero field), or its step below ``tolerance (1 + |w|)``.
        chord: for a residual that is not affine, with the Galerkin condition, keep
            the first iterate's matrix (chord iterations: a residual evaluation per
            iteration instead of a linearisation; the same root, and the exact
            matrix at it for the gradient). BENCHMARKS.md measures both.
        smoothing: sweeps of damped Jacobi on the FE system before the solve and
            after it (default 4; with the coarse grid, a two-grid cycle from the
            network's output): they remove the error at the mesh's scale, which the
            basis cannot carry, at the cost of one product with ``J`` each. With
            smoothing the output's residual is no longer exactly orthogonal to the
            basis; ``0`` gives the condition alone.
        global_solve: for a residual that is not affine, ``"newton"`` solves the
            condition by Newton's method; ``"linearised"`` solves it for the
            residual linearised at the prediction, one Newton step (one
            linearisation and one linear solve, the gradient through both): the
            condition then holds up to the square of the correction. Either way the
            sweeps before the solve solve the residual linearised at the
            prediction, and the grid and the sweeps after it the residual
            linearised at the solve's output (two linearisations a call; each sweep
            a sparse product, not a residual evaluation). ``"auto"`` (default):
            ``"newton"`` for one step of a time-dependent PDE (``residual.time_step``),
            ``"linearised"`` otherwise, the measured better of the two for each.
            On nonlinear diffusion (a steady problem) the linearised solve had
            0.70-0.80x the L2 and 0.87-0.94x the H1 error of Newton's at equal
            training time, with a 1.4-1.8x cheaper step (1.7e4 and 6.6e4 DOFs,
            four runs); on Allen-Cahn steppers one Newton step a time rolled out
            at twice Newton's error, and without the cycle diverged: a rollout
            feeds each step's leftover error into the next (BENCHMARKS.md).
        coarse_grid: a fixed coarse space after the solve: a Galerkin correction in
            the span of the hat functions of a ``G^d`` grid over the mesh's bounding
            box (:mod:`~fenop.operators.constraints.coarse`; for a residual that is
            not affine, of its linearisation), which holds the smooth part of the
            error that a basis from a grid coarser than the mesh misses. ``"auto"``
            (default): ``G - 1`` the square root of twice the mesh's cells per
            axis, capped at 1089 hats
            (:func:`~fenop.operators.constraints.coarse.auto_resolution`: 9 on a
            33 x 33 mesh, 17 on 129 x 129, 24 on 257 x 257, 33 from 513 x 513 up;
            none on a mesh of 7 x 7 vertices or fewer); an int ``G`` >= 3 that
            grid; ``0`` none. After it the residual is orthogonal
            to the coarse space, and no longer exactly to the basis. The default
            cycle (4 sweeps, the solve, the grid, 4 sweeps) divided the error of the
            solve alone by 3 to 6 at equal training time on 33 x 33 and 129 x 129
            meshes (BENCHMARKS.md).
        conserve: where the residual is a conservation law's (``residual.conserved``,
            e.g. heat with no-flux boundaries; affine residuals), impose its
            discrete balance exactly (default): the constant field joins the basis
            (the solves' Galerkin condition then holds the balance), and a last
            correction by a constant makes the sum of the residual over the free
            DOFs zero, which the sweeps and the grid after the solve leave off by
            their own error. ``False``: neither.
        frozen_jacobian: for a residual that is not affine, the gradient through
            the cycle's stages with each linearisation (``J`` and ``R(u) - J u``)
            held fixed: the output is the same, and the backward pass no longer
            goes through the linearisations (Newton's root keeps its exact
            implicit gradient). Not the default: the layer's backward pass took a
            seventh of the time and the training step 0.64x, but at equal training
            time the L2 error doubled (nonlinear diffusion at 6.6e4 DOFs;
            BENCHMARKS.md, "The gradient through the linearisations"). What it
            drops, ``J``'s derivative times each stage's correction, is small in
            norm; a likely reason is that a Newton-like stage cancels most of its
            output's first-order dependence on the prediction, so that the
            dropped term is a large part of what is left.

    Shapes:
        ``prediction (B, 1, n)``, ``basis (B, N, n)``, each input ``(B, n)`` ->
        ``(B, 1, n)`` in the prediction's dtype. Where :attr:`takes_grid_basis`, the
        basis may instead be values on a grid over the mesh's bounding box, ``(B,
        N, *grid)``, as :class:`~fenop.fem.FEDecoder` takes them: the fields are
        then their multilinear interpolants (zero on the Dirichlet DOFs), the same
        output, but the solve combines them in the grid's hats and never forms
        them on the mesh. :class:`~fenop.operators.FEOperator` hands a grid
        processor's basis over so: 32 fields then cost what 8 do, and the
        training step with 32 took 1.8x less time at 6.6e4 DOFs and 1.9x less
        at 2.6e5 (BENCHMARKS.md, "The basis on the grid").
    """

    @property
    def takes_grid_basis(self) -> bool:
        """Whether :meth:`forward` takes the basis as values on a grid: where its
        solve is a Galerkin one with an affine residual or a linearisation
        (``global_solve="linearised"``), on a mesh of two or three dimensions."""
        linear = self.affine or self.global_solve == "linearised"
        return self.rule.name == "galerkin" and linear and self.space.dim >= 2

    def forward(self, prediction, basis, **inputs):
        grid = self._grid_space(basis)  # None: the basis is on the mesh
        g, phi, inputs = self._prepare(prediction, basis, inputs, node_major=True, grid=grid)
        linear = self._linear_part(g, inputs)
        linearised = self.global_solve == "linearised"
        # For a residual that is not affine the stages before the solve (and, with
        # global_solve "linearised", the solve) take its linearisation at the
        # prediction, those after it its linearisation at the solve's output: two
        # Newton steps. One linearisation for all had 3x the L2 error in training
        # (BENCHMARKS.md, nonlinear diffusion at 1.7e4 DOFs).
        start = self._stage_linear(g, inputs, linear, self.smoothing or linearised)
        g = self._smoothed(g, start, prediction.dtype)
        linear_solved = start if linearised else linear
        u, ok, condition, iterations = self._global(g, phi, inputs, linear_solved, grid=grid)
        after = self.smoothing or self.coarse_space is not None
        end = self._stage_linear(u, inputs, linear, after)
        u, coarse_ok = self._coarse_corrected(u, end, inputs)
        u = self._conserved(self._smoothed(u, end, prediction.dtype), linear)
        return self._finish(
            u, ok & coarse_ok, [condition], iterations.sum(dim=1), prediction.dtype, inputs
        )
