"""Hard constraints on Darcy's FE residual: exactness, accuracy against the guess,
K = 1 against the global solve, DOF numbering, gradients, reported failures."""

import numpy as np
import pytest
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FEDecoder, FunctionSpace, GivenPartition, MetisPartition, unit_square
from fenop.fem.encoders import bounding_grid
from fenop.operators import HardConstraint, MoEConstraint
from tests.fem.test_partition import _renumbered
from tests.helpers import PLAIN


def _darcy(n: int, mesh=None):
    space = FunctionSpace(unit_square(n) if mesh is None else mesh, dirichlet="boundary")
    family = get_pde("darcy")(space)
    sample = family.sample(0, 0)
    a, u = (torch.from_numpy(sample[k])[None] for k in ("a", "u"))
    return space, family.residual(), a, u


def _relative(x, y) -> float:
    return float((x - y).norm() / y.norm())


def _smooth_fields(space, n_fields: int, seed: int) -> torch.Tensor:
    """``(n_fields, n_dofs)`` smooth fields vanishing on the boundary of the unit square."""
    rng = np.random.default_rng(seed)
    x, y = space.dof_points.T
    bubble = x * (1 - x) * y * (1 - y)
    fields = []
    for _ in range(n_fields):
        kx, ky, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, np.pi)
        fields.append(bubble * np.sin(kx * np.pi * x + phase) * np.cos(ky * np.pi * y))
    return torch.from_numpy(np.stack(fields))


LAYERS = {
    "global galerkin": lambda r: HardConstraint(r, **PLAIN),
    "global least squares": lambda r: HardConstraint(r, condition="least_squares", **PLAIN),
    "moe galerkin": lambda r: MoEConstraint(r, MetisPartition(experts=8), **PLAIN),
    "moe least squares": lambda r: MoEConstraint(
        r, MetisPartition(experts=8), condition="least_squares", **PLAIN
    ),
    "moe galerkin, no coarse solve": lambda r: MoEConstraint(
        r, MetisPartition(experts=8), coarse=False, sweeps=30, **PLAIN
    ),
    "moe galerkin, owners' values": lambda r: MoEConstraint(
        r, MetisPartition(experts=8), update="restricted_additive", **PLAIN
    ),
}


@pytest.mark.parametrize("name", [name for name in LAYERS if "no coarse" not in name])
def test_when_the_basis_spans_the_fe_solution_the_output_is_it(name):
    # (without the global solve, local corrections approach it only over many sweeps)
    space, residual, a, u = _darcy(17)
    # the solution hidden in a mixture with other fields; the guess is wrong everywhere
    fields = _smooth_fields(space, 3, seed=1)
    basis = torch.stack([u[0] + fields[0], fields[0], fields[1], fields[2]])[None]
    guess = (0.3 * fields[1])[None, None]
    out = LAYERS[name](residual)(guess, basis, a=a)
    assert _relative(out[:, 0], u) < 1e-8


def _guess_and_basis(space, u):
    """A guess 10 % off ``u`` ``(1, n)`` and a basis as a network might emit one:
    corrections of the guess and smooth fields, which cannot span ``u`` exactly.
    Returns ``guess (1, 1, n)`` and ``basis (1, 17, n)``."""
    perturbation = _smooth_fields(space, 1, seed=2)[0]
    guess = u[0] + 0.1 * u.abs().max() * perturbation / perturbation.abs().max()
    x, y = (torch.from_numpy(c) for c in space.dof_points.T)
    corrections = torch.stack([guess * x**i * y**j for i in range(3) for j in range(3)])
    basis = torch.cat([corrections, _smooth_fields(space, 8, seed=7)])
    return guess[None, None], basis[None]


def _perturbed_case():
    space, residual, a, u = _darcy(33)
    return space, residual, a, u, *_guess_and_basis(space, u)


def test_each_variant_improves_on_the_guess_and_no_interface_is_worse():
    _, residual, a, u, guess, basis = _perturbed_case()
    before = _relative(guess[:, 0], u)
    errors = {
        name: _relative(make(residual)(guess, basis, a=a)[:, 0], u) for name, make in LAYERS.items()
    }
    assert all(error < before for error in errors.values()), (before, errors)
    # experts without interface data or a coarse level: the formulation of the paper
    isolated = MoEConstraint(
        residual,
        MetisPartition(experts=8),
        condition="least_squares",
        overlap=0,
        coarse=False,
        sweeps=1,
        **PLAIN,
    )
    assert _relative(isolated(guess, basis, a=a)[:, 0], u) > 10 * errors["moe galerkin"]
    assert errors["global galerkin"] < errors["global least squares"]


@pytest.mark.parametrize("condition", ["galerkin", "least_squares"])
def test_one_expert_is_the_global_solve(condition):
    space, residual, a, _u, guess, basis = _perturbed_case()
    one = MoEConstraint(
        residual,
        GivenPartition(np.zeros(space.n_dofs, dtype=int)),
        condition=condition,
        coarse=False,
        sweeps=1,
        **PLAIN,
    )
    whole = HardConstraint(residual, condition=condition, **PLAIN)
    torch.testing.assert_close(
        one(guess, basis, a=a), whole(guess, basis, a=a), rtol=1e-10, atol=1e-12
    )


def _dense_darcy(space, a: torch.Tensor):
    """Darcy's residual ``R(u) = J u + r0`` as dense NumPy arrays, assembled by
    scikit-fem itself (identity rows at the Dirichlet DOFs)."""
    import skfem
    from skfem.helpers import dot, grad

    basis = space.basis
    stiffness = skfem.BilinearForm(lambda u, v, w: w["a"] * dot(grad(u), grad(v))).assemble(
        basis, a=basis.interpolate(a[0].numpy())
    )
    load = skfem.LinearForm(lambda v, w: 1.0 * v).assemble(basis)
    dirichlet = space.boundary_dofs
    jacobian = stiffness.toarray()
    jacobian[dirichlet] = 0.0
    jacobian[dirichlet, dirichlet] = 1.0
    offset = -load
    offset[dirichlet] = 0.0
    return jacobian, offset


@pytest.mark.parametrize("condition", ["galerkin", "least_squares"])
def test_expert_sweeps_equal_a_dense_schwarz_iteration(condition):
    # The two-level method written out with dense NumPy solves: a global solve, then
    # expert after expert, each one's N coefficients on its extended set from the
    # field the previous ones left. The layer solves a colour's experts at once: the
    # same thing when no expert of a colour reads R where another's correction moves
    # it, which is what its colouring must ensure.
    space, residual, a, _u, guess, _ = _perturbed_case()
    basis = _smooth_fields(space, 6, seed=7)[None]  # well conditioned on every patch
    layer = MoEConstraint(
        residual, MetisPartition(experts=8), condition=condition, sweeps=2, **PLAIN
    )
    out = layer(guess, basis, a=a)[0, 0].numpy()

    jacobian, offset = _dense_darcy(space, a)
    phi = basis[0].numpy()  # (N, n), zero on the boundary
    field = guess[0, 0].numpy().copy()

    def correction(test, applied, r):
        # Galerkin: test (χΦ), applied J(χΦ)ᵀ; least squares: both J(χΦ)ᵀ on the rows
        return np.linalg.solve(test @ applied.T, -test @ r)

    applied = phi @ jacobian.T
    test = phi if condition == "galerkin" else applied
    field += correction(test, applied, jacobian @ field + offset) @ phi
    coarse = field.copy()
    partition = layer.partition
    rows = partition.extended | partition.halo if condition == "least_squares" else None
    for _ in range(2):
        for colour in layer.colours:
            for k in colour:
                r = jacobian @ field + offset
                local = np.where(partition.extended[k], phi, 0.0)
                applied = local @ jacobian.T
                if condition == "galerkin":
                    w = correction(local, applied, r)
                else:
                    w = correction(applied[:, rows[k]], applied[:, rows[k]], r[rows[k]])
                field += w @ local
    tolerance = 1e-9 * np.abs(field).max()
    assert np.abs(field - coarse).max() > 1e4 * tolerance  # the sweeps do move the field
    np.testing.assert_allclose(out, field, rtol=0, atol=tolerance)


def test_the_output_does_not_depend_on_the_dof_numbering():
    mesh = unit_square(17)
    renumbered, new_of_old = _renumbered(mesh, seed=4)
    order = torch.from_numpy(new_of_old)
    outputs = []
    for m in (mesh, renumbered):
        space, residual, a, _ = _darcy(17, mesh=m)
        if m is renumbered:  # the first mesh's sample, renumbered
            a = torch.empty_like(a)
            a[0, order] = outputs[0][1]
        x, y = (torch.from_numpy(c) for c in space.dof_points.T)
        guess = x * (1 - x) * y * (1 - y)
        basis = torch.stack([guess * x**i * y**j for i in range(3) for j in range(3)])
        layer = MoEConstraint(residual, MetisPartition(experts=4), **PLAIN)
        outputs.append((layer(guess[None, None], basis[None], a=a)[0, 0], a[0]))
    torch.testing.assert_close(outputs[1][0][order], outputs[0][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: HardConstraint(r, **PLAIN),
        lambda r: HardConstraint(_advected(r, r.forms.space), **PLAIN),
        lambda r: MoEConstraint(r, MetisPartition(experts=2), overlap=1, sweeps=2, **PLAIN),
    ],
    ids=["global", "global, not symmetric", "moe"],
)
def test_gradients_pass_gradcheck(make):
    space, residual, a, u = _darcy(5)
    assert _gradcheck(make(residual), space, u, "a", a, fast=False)


def _advected(darcy, space):
    """Darcy's residual plus ``c ⊙ (M u)`` (``M`` the mass matrix, ``c`` varying by row,
    zero on the boundary): affine, on the FE pattern, and not symmetric."""
    x, y = (torch.from_numpy(coordinate) for coordinate in space.dof_points.T)
    weight = torch.where(darcy.dirichlet, 0.0, 50.0 * (1.0 + x - y))
    mass = space.mass.to_dense()

    class Advected(torch.nn.Module):  # the Residual protocol's members, no more
        forms, dirichlet, affine, symmetric = darcy.forms, darcy.dirichlet, True, False

        def forward(self, u, *, a):
            return darcy(u, a=a) + weight * (u @ mass)

    return Advected()


@pytest.mark.parametrize("symmetric", [True, False], ids=["darcy", "not symmetric"])
def test_the_global_galerkin_gradient_is_autograds_through_a_dense_solve(symmetric):
    # The global Galerkin solve of an affine residual has its backward pass written
    # out (Cholesky or, for a system that is not symmetric, LU and its transpose);
    # the reference is autograd through the same solve formed densely from the
    # residual's own evaluations: J φ_j = R(φ_j) - R(0).
    space, darcy, a, u = _darcy(9)
    residual = darcy if symmetric else _advected(darcy, space)
    layer = HardConstraint(residual, **PLAIN)
    assert layer.symmetric == symmetric
    fields = _smooth_fields(space, 3, seed=3)
    guess = (0.5 * u).requires_grad_(True)
    basis = (fields + 0.1 * u)[None].requires_grad_(True)
    field = a.clone().requires_grad_(True)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=u.dtype)

    def reference(g, phi, a):
        phi = torch.where(darcy.dirichlet, 0.0, phi)[0]
        zero = residual(torch.zeros_like(g), a=a)[0]
        applied = residual(phi, a=a.expand(len(phi), -1)) - zero  # J φ_j, (N, n)
        rhs = -phi @ residual(g, a=a)[0]
        w = torch.linalg.solve(phi @ applied.T, rhs)
        return (g[0] + w @ phi)[None]

    outputs = (layer(guess[:, None], basis, a=field)[:, 0], reference(guess, basis, field))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=0)
    grads = [torch.autograd.grad((out * weights).sum(), (guess, basis, field)) for out in outputs]
    for got, expected in zip(*grads, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


@pytest.mark.parametrize("condition", ["galerkin", "least_squares"])
def test_the_sweeps_written_out_equal_autograd_through_them(condition):
    # On one process the experts' sweeps have their backward pass written out; the
    # sharded layer's way, autograd through every solve, is the reference. (Gradients
    # in the coefficient a: a perturbation of J's entries alone that makes a
    # symmetric system unsymmetric has a gradient that depends on which triangle
    # Cholesky reads.)
    space, residual, a, u = _darcy(9)
    layer = MoEConstraint(
        residual, MetisPartition(experts=6), condition=condition, sweeps=2, **PLAIN
    )
    assert len(layer.colours) > 1
    free = layer.free.double()
    start = (0.8 * u).requires_grad_(True)
    phi = (_smooth_fields(space, 3, seed=3) + 0.1 * u)[None].requires_grad_(True)
    a = a.clone().requires_grad_(True)
    weights = torch.randn(u.shape, generator=torch.Generator().manual_seed(2), dtype=u.dtype)
    runs = []
    for written_out in (True, False):
        r0, values = layer._linear_part(start, {"a": a})
        r = layer.pattern.matmul(values, start[:, None])[:, 0] + r0
        if written_out:  # what one process runs
            out, ok, solves, conditions = layer._tracked_sweeps(start, r, phi * free, values)
        else:
            fields = layer._experts_fields(phi * free, values)
            out, ok, solves, conditions = layer._sweeps_through_autograd(start, r, *fields)
        assert bool(ok.all())
        grads = torch.autograd.grad((out * weights).sum(), (start, phi, a))
        runs.append((out.detach(), solves, torch.cat(conditions, dim=1).sort().values, *grads))
    assert float((runs[0][0] - start.detach()).abs().max()) > 1e-5  # the sweeps move the field
    for got, expected in zip(*runs, strict=True):
        torch.testing.assert_close(
            got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max())
        )


def _gradcheck(layer, space, u, name: str, field, *, fast: bool) -> bool:
    """torch's gradcheck of ``layer`` in its guess, its basis and its input ``name``."""
    fields = _smooth_fields(space, 2, seed=3)
    guess = (0.5 * u).clone().requires_grad_(True)
    basis = (fields + 0.1 * u).clone().requires_grad_(True)
    field = field.clone().requires_grad_(True)

    def run(g, phi, value):
        return layer(g[:, None], phi[None], **{name: value})

    return torch.autograd.gradcheck(
        run, (guess, basis, field), atol=1e-6, rtol=1e-5, fast_mode=fast
    )


def test_the_reported_residual_norm_is_the_outputs_made_when_first_read():
    space, residual, a, u = _darcy(9)
    layer = HardConstraint(residual)
    basis = _smooth_fields(space, 2, seed=1)[None]
    out = layer((0.9 * u)[:, None], basis, a=a)
    evaluations = []
    evaluate = layer._residual_of
    layer._residual_of = lambda *args: evaluations.append(1) or evaluate(*args)
    assert (
        list(layer.report) == ["converged", "singular", "condition", "iterations", "residual_norm"]
        and not evaluations
    )
    expected = torch.where(residual.dirichlet, 0.0, residual(out[:, 0], a=a)).norm(dim=-1)
    torch.testing.assert_close(layer.report["residual_norm"], expected, rtol=1e-10, atol=0)
    layer.report["residual_norm"]
    assert len(evaluations) == 1


def test_singular_systems_and_failed_solves_are_reported_not_hidden():
    space, residual, a, u = _darcy(17)
    field = _smooth_fields(space, 1, seed=5)[0]
    zero = torch.zeros_like(u)[:, None]
    good = HardConstraint(residual, **PLAIN)
    out = good(zero, field[None, None], a=a)
    assert good.report["converged"].tolist() == [True]
    assert good.report["singular"].tolist() == [0] and good.report["condition"][0] < 10
    free = ~residual.dirichlet
    expected = residual(out[:, 0], a=a)[..., free].norm()
    torch.testing.assert_close(good.report["residual_norm"][0], expected)
    # two equal basis fields: singular, solved through the ridge to the same output
    twice = HardConstraint(residual, **PLAIN)
    torch.testing.assert_close(twice(zero, torch.stack([field, field])[None], a=a), out)
    assert twice.report["singular"].tolist() == [1] and twice.report["converged"].tolist() == [True]
    # a basis with NaN: the solve fails, and says so
    broken = field.clone()
    broken[40] = float("nan")
    failed = MoEConstraint(residual, MetisPartition(experts=4), **PLAIN)
    failed(zero, broken[None, None], a=a)
    assert failed.report["converged"].tolist() == [False]


@pytest.mark.parametrize("condition", ["galerkin", "least_squares"])
def test_the_reported_condition_number_is_the_scaled_systems(condition):
    space, residual, a, u = _darcy(9)
    fields = _smooth_fields(space, 4, seed=2)
    # two of the fields nearly parallel: a system far from the identity
    basis = torch.stack([u[0], *fields[:3], fields[0] + 0.05 * fields[3]])[None]
    layer = HardConstraint(residual, condition=condition, **PLAIN)
    layer(torch.zeros_like(u)[:, None], basis, a=a)
    # the system on scikit-fem's matrix, scaled to a unit diagonal and ridged, by NumPy
    jacobian, _ = _dense_darcy(space, a)
    phi = basis[0].numpy() * ~residual.dirichlet.numpy()
    applied = phi @ jacobian.T
    matrix = phi @ applied.T if condition == "galerkin" else applied @ applied.T
    scale = 1 / np.sqrt(np.diag(matrix))
    scaled = scale[:, None] * matrix * scale[None] + layer.ridge * np.eye(len(matrix))
    expected = np.linalg.cond(scaled)
    assert expected > 100  # a case where the figure says something
    np.testing.assert_allclose(layer.report["condition"][0].item(), expected, rtol=1e-6)


def test_bad_arguments_are_refused():
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    residual = get_pde("darcy")(space).residual()
    with pytest.raises(ValueError, match="`condition` must be one of"):
        HardConstraint(residual, condition="ritz")
    with pytest.raises(ValueError, match=r"`prediction` must have shape \(batch, 1, 25\)"):
        HardConstraint(residual, **PLAIN)(
            torch.zeros(1, 25), torch.zeros(1, 2, 25), a=torch.ones(1, 25)
        )
    with pytest.raises(ValueError, match="`update` must be one of"):
        MoEConstraint(residual, MetisPartition(experts=2), update="jacobi")
    with pytest.raises(ValueError, match=r"`global_solve` must be one of \('auto'"):
        HardConstraint(residual, global_solve="picard")

    class Bare(torch.nn.Module):  # a residual without what the protocol names
        forms, affine = residual.forms, True

        def forward(self, u, *, a):
            return residual(u, a=a)

    with pytest.raises(TypeError, match=r"`residual` lacks dirichlet, symmetric: .*Residual"):
        HardConstraint(Bare())


@pytest.mark.parametrize("affine", [True, False])
def test_a_residual_coupling_dofs_that_share_no_cell_is_refused(affine):
    # Darcy's residual plus a term coupling every DOF to the mean: its Jacobian is
    # dense, which the colouring of the FE pattern cannot recover
    space, darcy, a, _ = _darcy(9)

    class Coupled(torch.nn.Module):
        forms, dirichlet, symmetric = darcy.forms, darcy.dirichlet, True

        def forward(self, u, *, a):
            mean = u.mean(dim=-1, keepdim=True)
            return darcy(u, a=a) + (mean if affine else mean**3)

    Coupled.affine = affine
    basis = _smooth_fields(space, 2, seed=0)[None]
    with pytest.raises(ValueError, match="does not fit the FE pattern"):
        guess = torch.full((1, 1, space.n_dofs), 0.5, dtype=torch.float64)
        HardConstraint(Coupled())(guess, basis, a=a)


# -- a nonlinear residual: -div((1 + u²) ∇u) = f ------------------------------------------


def _nonlinear(n: int):
    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    family = get_pde("nonlinear_diffusion")(space)
    sample = family.sample(0, 0)
    f, u = (torch.from_numpy(sample[k])[None] for k in ("f", "u"))
    return space, family.residual(), f, u


NONLINEAR = {
    "global galerkin": lambda r: HardConstraint(r, **PLAIN),
    "global least squares": lambda r: HardConstraint(r, condition="least_squares", **PLAIN),
    "moe galerkin": lambda r: MoEConstraint(r, MetisPartition(experts=4), sweeps=2, **PLAIN),
    "moe least squares": lambda r: MoEConstraint(
        r, MetisPartition(experts=4), condition="least_squares", sweeps=2, **PLAIN
    ),
    "moe galerkin, newton": lambda r: MoEConstraint(
        r, MetisPartition(experts=4), sweeps=2, nonlinear="newton", **PLAIN
    ),
    "moe least squares, newton": lambda r: MoEConstraint(
        r,
        MetisPartition(experts=4),
        condition="least_squares",
        sweeps=2,
        nonlinear="newton",
        **PLAIN,
    ),
}


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_when_the_basis_spans_the_solution_newton_finds_it(name):
    space, residual, f, u = _nonlinear(17)
    fields = _smooth_fields(space, 3, seed=1)
    basis = torch.stack([u[0] + fields[0], fields[0], fields[1], fields[2]])[None]
    layer = NONLINEAR[name](residual)
    out = layer((0.3 * fields[1])[None, None], basis, f=f)
    assert _relative(out[:, 0], u) < 1e-8
    assert layer.report["converged"].tolist() == [True]
    assert 1 < layer.report["iterations"][0] < 200  # Newton's, summed over the solves


def test_nonlinear_galerkin_improves_on_the_guess_more_than_least_squares():
    space, residual, f, u = _nonlinear(33)
    guess, basis = _guess_and_basis(space, u)
    before = _relative(guess[:, 0], u)
    errors = {
        name: _relative(make(residual)(guess, basis, f=f)[:, 0], u)
        for name, make in NONLINEAR.items()
    }
    assert all(e < before for e in errors.values()), (before, errors)
    assert errors["global galerkin"] < errors["global least squares"]
    assert errors["moe galerkin"] < errors["global galerkin"]


def _nonlinear_gradcheck(name: str, *, fast: bool) -> bool:
    space, residual, f, u = _nonlinear(5)
    return _gradcheck(NONLINEAR[name](residual), space, u, "f", f, fast=fast)


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_gradients_pass_gradcheck(name):
    # In full for the global solves; for the experts (a full check takes 20 s each)
    # against random directions here, in full under -m slow.
    assert _nonlinear_gradcheck(name, fast=name.startswith("moe"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in NONLINEAR if name.startswith("moe")])
def test_nonlinear_expert_gradients_pass_the_full_gradcheck(name):
    assert _nonlinear_gradcheck(name, fast=False)


def test_the_implicit_gradient_equals_the_unrolled_newtons():
    space, residual, f, u = _nonlinear(9)
    fields = _smooth_fields(space, 3, seed=4)
    guess = (0.8 * u).clone().requires_grad_(True)
    basis = (fields + 0.2 * u).clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, space.n_dofs, dtype=torch.float64)

    def loss(out):
        return (out.reshape(-1) * weights).sum()

    implicit = torch.autograd.grad(
        loss(HardConstraint(residual, **PLAIN)(guess[:, None], basis[None], f=f)), (guess, basis)
    )
    # Newton unrolled with autograd through every iteration
    free = ~residual.dirichlet
    phi = torch.where(free, basis, 0.0)[None]
    w = torch.zeros(1, 3, dtype=torch.float64)
    for _ in range(30):
        v = guess + (w[:, None] @ phi)[:, 0]
        r = residual(v, f=f)
        primal = v[:, None].repeat(1, 3, 1)
        _, jphi = torch.func.jvp(lambda z: residual(z, f=f[:, None]), (primal,), (phi,))
        w = w - torch.linalg.solve(phi @ jphi.transpose(-1, -2), (phi @ r[..., None])[..., 0])
    unrolled = torch.autograd.grad(loss(guess + (w[:, None] @ phi)[:, 0]), (guess, basis))
    for a, b in zip(implicit, unrolled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_newton_that_does_not_converge_is_reported():
    space, residual, f, u = _nonlinear(9)
    basis = torch.stack([u[0], *_smooth_fields(space, 2, seed=1)])[None]
    layer = HardConstraint(residual, max_iterations=1, **PLAIN)
    out = layer(torch.zeros_like(u)[:, None], basis, f=f)
    assert layer.report["converged"].tolist() == [False] and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda r, chord: HardConstraint(r, chord=chord, **PLAIN),
        lambda r, chord: MoEConstraint(
            r, MetisPartition(experts=4), sweeps=2, chord=chord, nonlinear="newton", **PLAIN
        ),
    ],
    ids=["global", "moe"],
)
def test_chord_iterations_reach_newtons_root_and_gradient(make):
    space, residual, f, u = _nonlinear(9)
    fields = _smooth_fields(space, 3, seed=4)
    guess = (0.8 * u).clone().requires_grad_(True)
    basis = (fields + 0.2 * u).clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, space.n_dofs, dtype=torch.float64)
    results = []
    for chord in (True, False):
        layer = make(residual, chord)
        out = layer(guess[:, None], basis[None], f=f)
        grads = torch.autograd.grad((out.reshape(-1) * weights).sum(), (guess, basis))
        assert layer.report["converged"].tolist() == [True]
        results.append((out.detach(), *grads))
    # the same root to the solves' tolerance (1e-10), so the same gradient nearly
    for chord_value, newton_value in zip(*results, strict=True):
        torch.testing.assert_close(chord_value, newton_value, rtol=1e-6, atol=1e-9)


# Layers with one Newton step where Newton's method could solve, by the option's
# value ("newton" or "linearised"), and how much more than their gap to Newton's
# root the correction itself is at least.
SECOND_ORDER = {
    "experts galerkin": (
        lambda r, how: MoEConstraint(r, MetisPartition(experts=4), nonlinear=how, **PLAIN),
        1e3,
    ),
    "experts least squares": (
        lambda r, how: MoEConstraint(
            r, MetisPartition(experts=4), condition="least_squares", nonlinear=how, **PLAIN
        ),
        1e3,
    ),
    "global galerkin": (lambda r, how: HardConstraint(r, **{**PLAIN, "global_solve": how}), 30),
    "global least squares": (
        lambda r, how: HardConstraint(
            r, condition="least_squares", **{**PLAIN, "global_solve": how}
        ),
        30,
    ),
    "moe coarse": (  # its coarse solve alone
        lambda r, how: MoEConstraint(
            r, MetisPartition(experts=4), sweeps=0, **{**PLAIN, "global_solve": how}
        ),
        30,
    ),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_one_newton_step_differs_from_newtons_root_by_the_square_of_the_correction(name):
    # One Newton step (the experts on the linearisation at the coarse solution, or
    # the global solve on the linearisation at the prediction) against Newton's
    # root: the gap is second order in the distance from the solution, so halving
    # the guess's error quarters it.
    make, factor = SECOND_ORDER[name]
    space, residual, f, u = _nonlinear(17)
    direction = _smooth_fields(space, 1, seed=2)[0]
    direction = direction / direction.abs().max() * u.abs().max()
    basis = _smooth_fields(space, 6, seed=7)[None]
    gaps = []
    for size in (0.2, 0.1):
        guess = (u[0] + size * direction)[None, None]
        outs = [make(residual, how)(guess, basis, f=f) for how in ("newton", "linearised")]
        gaps.append(_relative(outs[1], outs[0]))
        assert _relative(outs[0], guess) > factor * gaps[-1]  # the solves did correct it
    assert 3.5 < gaps[0] / gaps[1] < 4.5, gaps


def test_a_linearised_global_solve_meets_the_condition_of_the_linearisation():
    # Φᵀ (R(g) + J(g) (out - g)) = 0, with J by finite differences of the residual
    space, residual, f, u = _nonlinear(9)
    basis = _smooth_fields(space, 4, seed=5)
    guess = 0.7 * u
    layer = HardConstraint(residual, **{**PLAIN, "global_solve": "linearised"})
    out = layer(guess[:, None], basis[None], f=f)[:, 0]
    step, h = out - guess, 1e-6
    jacobian_step = (residual(guess + h * step, f=f) - residual(guess - h * step, f=f)) / (2 * h)
    linearised = residual(guess, f=f) + jacobian_step
    free = ~residual.dirichlet
    tested = basis[:, free] @ linearised[0, free]
    assert tested.abs().max() < 1e-7 * (basis[:, free] @ residual(guess, f=f)[0, free]).abs().max()
    assert layer.report["iterations"].tolist() == [1] and layer.report["converged"].all()
    with pytest.raises(ValueError, match="global_solve"):
        HardConstraint(residual, **{**PLAIN, "global_solve": "chord"})


def test_a_linearised_global_solve_passes_gradcheck():
    space, residual, f, u = _nonlinear(5)
    layer = HardConstraint(residual, **{**PLAIN, "global_solve": "linearised"})
    assert _gradcheck(layer, space, u, "f", f, fast=False)


DEPENDENT = {
    "global": lambda r: HardConstraint(r, **PLAIN),
    "moe": lambda r: MoEConstraint(r, MetisPartition(experts=4), sweeps=2, **PLAIN),
}


@pytest.mark.parametrize("pde", ["darcy", "nonlinear_diffusion"])
@pytest.mark.parametrize("kind", list(DEPENDENT))
def test_dependent_basis_fields_have_the_ridged_solves_finite_gradient(pde, kind):
    # A network can emit two equal basis fields at any step: the systems are then
    # singular (reported), solved through the ridge, and the backward pass must solve
    # as the forward did, not fail (it raised LinAlgError for a nonlinear residual).
    # With the two fields tied, the output depends on their sum alone, a smooth
    # function of the inputs, whose gradient gradcheck compares by finite differences.
    space, residual, field, u = _darcy(5) if pde == "darcy" else _nonlinear(5)
    name = "a" if pde == "darcy" else "f"
    layer = DEPENDENT[kind](residual)
    guess = (0.5 * u).clone().requires_grad_(True)
    phi = (_smooth_fields(space, 1, seed=3)[0] + 0.1 * u[0]).clone().requires_grad_(True)
    field = field.clone().requires_grad_(True)

    def run(g, phi, value):  # the basis: one field twice, an exactly singular system
        return layer(g[:, None], torch.stack([phi, phi])[None], **{name: value})

    out = run(guess, phi, field)
    assert layer.report["singular"].sum() > 0 and layer.report["converged"].all()
    out.square().sum().backward()  # a training step's backward pass: finite
    for tensor in (guess, phi, field):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(run, (guess, phi, field), atol=1e-6, rtol=1e-5)


def _jacobi(jacobian, offset, free, u, sweeps):
    """Damped Jacobi (weight 2/3) on a dense system ``J u + r0 = 0``, free DOFs only."""
    for _ in range(sweeps):
        u = u - np.where(free, 2 / 3 * (jacobian @ u + offset) / np.diag(jacobian), 0.0)
    return u


def _grid_hats(space, resolution, free) -> np.ndarray:
    """``(n, m)``: a grid's hat functions at the free DOFs, those seen kept."""
    p = bounding_grid(space, resolution).interpolation_matrix(space.dof_points).toarray()
    p = p * free[:, None]
    return p[:, np.abs(p).sum(axis=0) > 0]


@pytest.mark.parametrize("coarse_grid", [0, 5])
def test_smoothing_is_damped_jacobi_around_the_galerkin_solve(coarse_grid):
    # a two-grid cycle whose coarse space is the basis (then, with a coarse grid, the
    # grid's hats), against one written in NumPy on scikit-fem's own assembly
    space, residual, a, u = _darcy(17)
    guess, basis = _guess_and_basis(space, u)
    guess = guess + 0.01 * torch.randn(guess.shape, generator=torch.Generator().manual_seed(3))
    guess[..., space.boundary_dofs] = 0.0
    jacobian, offset = _dense_darcy(space, a)
    free = np.ones(space.n_dofs, dtype=bool)
    free[space.boundary_dofs] = False
    phi = np.where(free, basis[0].numpy(), 0.0)
    start = _jacobi(jacobian, offset, free, guess[0, 0].numpy(), 3)
    w = np.linalg.solve(phi @ jacobian @ phi.T, -phi @ (jacobian @ start + offset))
    solved = start + w @ phi
    if coarse_grid:
        p = _grid_hats(space, coarse_grid, free)
        solved = solved + p @ np.linalg.solve(
            p.T @ jacobian @ p, -p.T @ (jacobian @ solved + offset)
        )
    expected = _jacobi(jacobian, offset, free, solved, 3)
    layer = HardConstraint(residual, smoothing=3, coarse_grid=coarse_grid)
    out = layer(guess, basis, a=a)
    # with the grid, to the rounding of the reference's solve in the 17 ill-conditioned
    # fields that the grid's correction then carries (1.8e-10 of the largest value)
    tolerance = 1e-9 if coarse_grid else 1e-10
    np.testing.assert_allclose(
        out[0, 0].numpy(), expected, rtol=0, atol=tolerance * abs(expected).max()
    )
    assert layer.report["converged"].tolist() == [True]


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, 0.0), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)]
)
def test_the_sweeps_run_in_the_outputs_precision(monkeypatch, dtype, tolerance):
    # float64 and float32 outputs: sweeps in their precision (half precisions: in
    # float32); the output that of the float64 layer on the same (rounded) inputs,
    # to the output's rounding
    space, residual, a, u = _darcy(17)
    guess, basis = _guess_and_basis(space, u)
    guess, basis, a = (x.to(dtype) for x in (guess, basis, a))
    layer = HardConstraint(residual)
    seen = []
    jacobi = layer.pattern.jacobi

    def spy(values, *args, **kwargs):
        seen.append(values.dtype)
        return jacobi(values, *args, **kwargs)

    monkeypatch.setattr(layer.pattern, "jacobi", spy)
    out = layer(guess, basis, a=a)
    assert out.dtype == dtype
    assert seen == [torch.float64 if dtype == torch.float64 else torch.float32] * 2
    expected = layer(guess.double(), basis.double(), a=a.double())
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: HardConstraint(r, smoothing=4, coarse_grid=0),
        lambda r: MoEConstraint(r, MetisPartition(experts=8), smoothing=4, coarse_grid=0),
    ],
    ids=["global", "moe"],
)
def test_smoothing_removes_the_error_at_the_mesh_scale(make):
    # a guess whose error is rough at the mesh's scale, which no smooth basis carries
    space, residual, a, u = _darcy(33)
    guess, basis = _guess_and_basis(space, u)
    noise = torch.randn(guess.shape, generator=torch.Generator().manual_seed(4), dtype=u.dtype)
    noise[..., space.boundary_dofs] = 0.0
    guess = guess + 0.02 * u.abs().max() * noise
    plain = {
        "global": HardConstraint(residual, **PLAIN),
        "moe": MoEConstraint(residual, MetisPartition(experts=8), **PLAIN),
    }
    layer = make(residual)
    kind = "global" if isinstance(layer, HardConstraint) else "moe"
    stiffness = space.stiffness_matrix

    def energy_error(out):
        e = (out[0, 0] - u[0]).numpy()
        return float(np.sqrt(e @ stiffness @ e))

    smoothed, unsmoothed = layer(guess, basis, a=a), plain[kind](guess, basis, a=a)
    assert energy_error(smoothed) < 0.5 * energy_error(unsmoothed)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: HardConstraint(r, smoothing=2, coarse_grid=0),
        lambda r: MoEConstraint(r, MetisPartition(experts=4), sweeps=2, smoothing=2, coarse_grid=0),
        lambda r: HardConstraint(r, coarse_grid=3, smoothing=1),
        lambda r: MoEConstraint(r, MetisPartition(experts=4), sweeps=2, coarse_grid=3, smoothing=0),
    ],
    ids=["global", "moe", "global coarse grid", "moe coarse grid"],
)
def test_smoothing_and_a_coarse_grid_keep_a_nonlinear_solution_and_pass_gradcheck(make):
    # R(u*) = 0: neither the sweeps, nor the solves, nor the coarse grid's correction
    # (of the residual linearised there) move the FE solution
    space, residual, f, u = _nonlinear(17)
    basis = _smooth_fields(space, 3, seed=1)[None]
    out = make(residual)(u[:, None], basis, f=f)
    assert _relative(out[:, 0], u) < 1e-8
    small, residual, f, u = _nonlinear(5)
    assert _gradcheck(make(residual), small, u, "f", f, fast=True)


@pytest.mark.parametrize("options", [{"smoothing": 2}, {"coarse_grid": 3, "smoothing": 1}])
def test_smoothing_and_coarse_grid_gradients_pass_gradcheck(options):
    space, residual, a, u = _darcy(5)
    layer = MoEConstraint(
        residual, MetisPartition(experts=2), overlap=1, sweeps=2, **{**PLAIN, **options}
    )
    assert _gradcheck(layer, space, u, "a", a, fast=False)
    assert _gradcheck(
        HardConstraint(residual, **{**PLAIN, **options}), space, u, "a", a, fast=False
    )


def _dense_linearisation(residual, f, v):
    """``R(v)`` ``(n,)`` and the dense ``J(v)`` ``(n, n)`` of ``residual`` for the input
    ``f``, by autograd, at ``v`` ``(n,)``."""
    r = residual(v[None], f=f)[0].detach()
    jacobian = torch.autograd.functional.jacobian(lambda x: residual(x[None], f=f)[0], v)
    return r, jacobian.detach()


def _dense_cycle(residual, f, guess, phi, hats, sweeps, how):
    """The layers' cycle for a residual that is not affine, dense, from ``guess``
    ``(n,)``, with the basis ``phi`` ``(N, n)`` and the grid's hats ``(n, m)`` (both
    zero on the Dirichlet DOFs): Jacobi sweeps on the residual linearised at the
    guess, the Galerkin solve (``how``: Newton's iterations on the residual, or
    one step on that linearisation), then the grid's correction and the sweeps on
    the residual linearised at the solve's output."""
    free = (~residual.dirichlet).numpy()

    def jacobi(x, r, jacobian, at):  # on R(at) + J (x - at) = J x + (R(at) - J at)
        offset = (r - jacobian @ at).numpy()
        return torch.from_numpy(_jacobi(jacobian.numpy(), offset, free, x.numpy(), sweeps))

    r, jacobian = _dense_linearisation(residual, f, guess)
    x = jacobi(guess, r, jacobian, guess)
    if how == "linearised":
        rx = r + jacobian @ (x - guess)
        u = x + phi.T @ torch.linalg.solve(phi @ jacobian @ phi.T, -phi @ rx)
    else:
        u = x
        for _ in range(30):
            r_u, j_u = _dense_linearisation(residual, f, u)
            u = u - phi.T @ torch.linalg.solve(phi @ j_u @ phi.T, phi @ r_u)
    r, jacobian = _dense_linearisation(residual, f, u)
    c = torch.linalg.solve(hats.T @ jacobian @ hats, -hats.T @ r)
    return jacobi(u + hats @ c, r, jacobian, u)


@pytest.mark.parametrize("how", ["newton", "linearised"])
def test_the_cycle_of_a_nonlinear_residual_is_two_newton_steps_against_a_dense_one(how):
    # the sweeps before the solve on the residual linearised at the prediction, the
    # grid and the sweeps after it on the residual linearised at the solve's output,
    # the solve by Newton's method or, linearised, on the first: against the same
    # written densely with autograd's Jacobians; the report's residual is the
    # residual's own
    space, residual, f, u = _nonlinear(17)
    direction = _smooth_fields(space, 1, seed=2)[0]
    guess = u[0] + 0.2 * direction / direction.abs().max() * u.abs().max()
    basis = _smooth_fields(space, 4, seed=7)
    free = ~residual.dirichlet
    phi = torch.where(free, basis, 0.0)
    hats = torch.from_numpy(_grid_hats(space, 5, free.numpy()))
    layer = HardConstraint(residual, smoothing=3, coarse_grid=5, global_solve=how)
    out = layer(guess[None, None], basis[None], f=f)[0, 0]
    expected = _dense_cycle(residual, f, guess, phi, hats, 3, how)
    assert _relative(out, expected) < 1e-9
    assert _relative(out, guess) > 1e-3  # the cycle did move the guess
    own = torch.where(free, residual(out[None], f=f)[0], 0.0).norm()
    assert abs(float(layer.report["residual_norm"][0]) - float(own)) <= 1e-12 * float(own)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: HardConstraint(r, smoothing=2, coarse_grid=3, global_solve="linearised"),
        lambda r: MoEConstraint(
            r,
            MetisPartition(experts=4),
            sweeps=2,
            smoothing=2,
            coarse_grid=3,
            global_solve="linearised",
        ),
    ],
    ids=["global", "moe"],
)
def test_a_linearised_cycle_passes_gradcheck(make):
    small, residual, f, u = _nonlinear(5)
    assert _gradcheck(make(residual), small, u, "f", f, fast=True)


def _frozen_dense_cycle(residual, f, guess, phi, hats, sweeps):
    """:func:`_dense_cycle`'s linearised cycle in torch, differentiable in ``guess``
    ``(n,)`` and ``phi`` ``(N, n)`` with each linearisation held fixed: ``R(at)`` and
    ``J(at)`` constants, so that each stage is affine in the field it starts from."""
    free = ~residual.dirichlet

    def jacobi(x, r, jacobian, at):  # on R(at) + J (x - at), as _dense_cycle's
        step = torch.where(free, 2 / 3 / torch.diagonal(jacobian), 0.0)
        for _ in range(sweeps):
            x = x - step * (jacobian @ (x - at) + r)
        return x

    at = guess.detach()
    r, jacobian = _dense_linearisation(residual, f, at)
    x = jacobi(guess, r, jacobian, at)
    rx = r + jacobian @ (x - at)
    u = x + phi.T @ torch.linalg.solve(phi @ jacobian @ phi.T, -phi @ rx)
    at = u.detach()
    r, jacobian = _dense_linearisation(residual, f, at)
    c = torch.linalg.solve(hats.T @ jacobian @ hats, -hats.T @ (r + jacobian @ (u - at)))
    return jacobi(u + hats @ c, r, jacobian, at)


def _cycle_case(eps: float):
    """Nonlinear diffusion on 17 x 17: a guess ``eps`` (relative, in the max norm) off
    the solution along a smooth field, 4 smooth basis fields, the input ``f``."""
    space, residual, f, u = _nonlinear(17)
    direction = _smooth_fields(space, 1, seed=2)[0]
    guess = u[0] + eps * direction / direction.abs().max() * u.abs().max()
    return space, residual, f, guess, _smooth_fields(space, 4, seed=7)


def _output_and_gradients(layer, guess, basis, f, weights):
    """The layer's output ``(n,)`` and the gradients of ``weights · output`` in the
    guess ``(n,)`` and the basis ``(N, n)``."""
    g, phi = guess.clone().requires_grad_(), basis.clone().requires_grad_()
    out = layer(g[None, None], phi[None], f=f)[0, 0]
    (out * weights).sum().backward()
    return out.detach(), g.grad, phi.grad


# the cycle with its gradient through J(u) (False) and with J held fixed (True)
CYCLES = {
    "global, newton": lambda r, frozen: HardConstraint(
        r, smoothing=3, coarse_grid=5, global_solve="newton", frozen_jacobian=frozen
    ),
    "global, linearised": lambda r, frozen: HardConstraint(
        r, smoothing=3, coarse_grid=5, global_solve="linearised", frozen_jacobian=frozen
    ),
    "moe": lambda r, frozen: MoEConstraint(
        r, MetisPartition(experts=4), sweeps=2, smoothing=2, coarse_grid=5, frozen_jacobian=frozen
    ),
}


def _exact_and_frozen(name: str, eps: float):
    """``(output, gradient in the guess, in the basis)`` of the cycle ``name`` with
    and without J held fixed, on :func:`_cycle_case`."""
    space, residual, f, guess, basis = _cycle_case(eps)
    weights = torch.randn(space.n_dofs, generator=torch.Generator().manual_seed(0)).double()
    return [
        _output_and_gradients(CYCLES[name](residual, frozen), guess, basis, f, weights)
        for frozen in (False, True)
    ]


@pytest.mark.parametrize("name", list(CYCLES))
def test_a_frozen_jacobian_keeps_the_output(name):
    exact, held = _exact_and_frozen(name, 0.2)
    assert _relative(held[0], exact[0]) < 1e-12
    # what it changes is the gradient: J(u)'s dependence on u is left out
    assert _relative(held[1], exact[1]) > 1e-6
    assert all(torch.isfinite(g).all() for g in held[1:])


def test_the_frozen_gradient_is_autograds_through_the_cycle_with_fixed_linearisations():
    space, residual, f, guess, basis = _cycle_case(0.2)
    weights = torch.randn(space.n_dofs, generator=torch.Generator().manual_seed(0)).double()
    layer = CYCLES["global, linearised"](residual, True)
    out, grad_guess, grad_basis = _output_and_gradients(layer, guess, basis, f, weights)
    free = ~residual.dirichlet
    hats = torch.from_numpy(_grid_hats(space, 5, free.numpy()))
    g, b = guess.clone().requires_grad_(), basis.clone().requires_grad_()
    expected = _frozen_dense_cycle(residual, f, g, torch.where(free, b, 0.0), hats, 3)
    (expected * weights).sum().backward()
    assert _relative(out, expected.detach()) < 1e-9
    assert _relative(grad_guess, g.grad) < 1e-8
    assert _relative(grad_basis, b.grad) < 1e-8


@pytest.mark.parametrize("name", list(CYCLES))
def test_the_frozen_gradients_error_is_first_order_in_the_predictions(name):
    # the term left out is J's derivative times each stage's correction, which is
    # of the size of the prediction's error
    differences = []
    for eps in (0.1, 0.01):
        exact, held = _exact_and_frozen(name, eps)
        differences.append([_relative(h, e) for h, e in zip(held[1:], exact[1:], strict=True)])
    for coarse, fine in zip(*differences, strict=True):
        assert 5 < coarse / fine < 20, differences


def test_a_frozen_jacobian_leaves_an_affine_residuals_gradient_exact():
    space, residual, a, u = _darcy(9)
    guess, basis = _guess_and_basis(space, u)
    weights = torch.randn(space.n_dofs, generator=torch.Generator().manual_seed(0)).double()
    for make in (HardConstraint, lambda r, **o: MoEConstraint(r, MetisPartition(experts=4), **o)):
        results = []
        for frozen in (False, True):
            g, phi = guess.clone().requires_grad_(), basis.clone().requires_grad_()
            out = make(residual, frozen_jacobian=frozen)(g, phi, a=a)
            (out[0, 0] * weights).sum().backward()
            results.append((out.detach(), g.grad, phi.grad))
        for exact, held in zip(*results, strict=True):
            assert torch.equal(exact, held)


def _no_flux_heat(n: int):
    """A no-flux heat step on ``unit_square(n)`` (no Dirichlet DOFs): the space, its
    residual, the state before the step ``(1, n)`` and the next one."""
    space = FunctionSpace(unit_square(n))
    heat = get_pde("heat")(space, boundary="no_flux", trajectory=True, n_steps=2, t_final=0.005)
    states = torch.from_numpy(heat.sample(0, 0)["u"])
    return space, heat.residual(), states[1:2], states[2:3]


CONSERVING = {
    "global, default cycle": lambda r, c: HardConstraint(r, conserve=c),
    "global, alone": lambda r, c: HardConstraint(r, conserve=c, **PLAIN),
    "moe, default cycle": lambda r, c: MoEConstraint(r, MetisPartition(experts=4), conserve=c),
}


@pytest.mark.parametrize("name", CONSERVING)
def test_a_conservation_law_is_imposed_exactly_and_costs_no_accuracy(name):
    space, residual, previous, target = _no_flux_heat(17)
    torch.manual_seed(0)
    noise = torch.randn_like(target) * target.norm() / space.n_dofs**0.5
    guess = target + 0.05 * noise
    basis = _smooth_fields(space, 4, seed=1)[None]  # zero on the boundary: no constant
    outputs = {
        conserve: CONSERVING[name](residual, conserve)(guess[:, None], basis, u_prev=previous)
        for conserve in (True, False)
    }
    mass = space.mass_matrix.sum(axis=0)  # ∫ φ_i: a state's heat is mass @ u
    scale = float(np.abs(mass) @ np.abs(previous[0].numpy()))
    balance = {k: abs(float(mass @ (v[0, 0] - previous[0]).numpy())) for k, v in outputs.items()}
    assert balance[True] < 1e-13 * scale  # the step's discrete balance, exactly
    assert balance[False] > 1e3 * balance[True]
    # the error in the step's energy norm, eᵀ J e = eᵀ (R(target + e) - R(target)):
    # the solve alone is Galerkin's in a larger span (the constant joins the basis),
    # so it cannot grow; the cycle's sweeps and grid come after it, and nearly solve
    # the step by themselves
    energy = {
        k: float(
            (v[0, 0] - target[0])
            @ (residual(v[0, 0], u_prev=previous[0]) - residual(target[0], u_prev=previous[0]))
        )
        for k, v in outputs.items()
    }
    if name == "global, alone":
        assert energy[True] <= energy[False] * (1 + 1e-12)
    else:
        assert energy[True] < 1.01 * energy[False]


def test_conservation_passes_gradcheck_and_is_refused_for_a_nonlinear_residual():
    space, residual, previous, target = _no_flux_heat(5)
    layer = HardConstraint(residual, smoothing=1, coarse_grid=3)
    assert layer.conserves
    assert _gradcheck(layer, space, target, "u_prev", previous, fast=False)
    _, nonlinear, _, _ = _nonlinear(5)
    nonlinear.conserved = True
    with pytest.raises(ValueError, match="only for an affine residual; pass conserve=False"):
        HardConstraint(nonlinear)
    assert not HardConstraint(nonlinear, conserve=False).conserves


# A basis on a grid: the fields a network emits there, combined in the grid's hats
# instead of decoded to the mesh (what FEOperator hands a global Galerkin solve).
GRID_BASES = {
    "darcy, default cycle": (lambda: _darcy(17), "a", lambda r: HardConstraint(r)),
    "darcy, the solve alone": (lambda: _darcy(17), "a", lambda r: HardConstraint(r, **PLAIN)),
    "nonlinear diffusion, linearised": (lambda: _nonlinear(17), "f", HardConstraint),
    "no-flux heat, conserved": (lambda: _no_flux_heat(17), "u_prev", HardConstraint),
}


@pytest.mark.parametrize("name", GRID_BASES)
@pytest.mark.parametrize("resolution", [6, 24])  # fewer hats than free DOFs, and more
def test_a_basis_on_a_grid_gives_the_decoded_basis_output_and_gradients(name, resolution):
    make_case, input_name, make = GRID_BASES[name]
    space, residual, field, u = make_case()
    layer = make(residual)
    assert layer.takes_grid_basis
    generator = torch.Generator().manual_seed(0)
    shape = (1, 3, resolution, resolution)
    values = torch.randn(shape, dtype=torch.float64, generator=generator) * u.std()
    guess = u + 0.05 * u.std() * torch.randn(u.shape, dtype=torch.float64, generator=generator)
    weights = torch.randn(u.shape, dtype=torch.float64, generator=generator)
    decoder = FEDecoder(space, resolution).double()  # zero Dirichlet values
    results = []
    for on_grid in (True, False):
        g, b, x = (t.clone().requires_grad_(True) for t in (guess, values, field))
        out = layer(g[:, None], b if on_grid else decoder(b), **{input_name: x})
        (out[:, 0] * weights).sum().backward()
        results.append((out.detach(), g.grad, b.grad, x.grad))
    # the layer moved the guess (two paths that did nothing would agree too)
    assert _relative(results[1][0][:, 0], guess) > 1e-4
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max())


def test_a_basis_on_a_grid_is_taken_by_the_galerkin_solve_of_a_linear_system_alone():
    _, residual, a, u = _darcy(9)
    values = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    refusing = (
        HardConstraint(residual, condition="least_squares"),
        MoEConstraint(residual, MetisPartition(experts=2)),
    )
    for layer in refusing:
        assert not layer.takes_grid_basis
        with pytest.raises(ValueError, match=r"`basis` must have shape \(1, N, 81\), got"):
            layer(u[:, None], values, a=a)
    with pytest.raises(ValueError, match=r"\(1, N, 81\) or \(1, N, \*grid\), got \(1, 2, 5\)"):
        HardConstraint(residual)(u[:, None], values[..., 0], a=a)
    _, nonlinear, _, _ = _nonlinear(9)
    assert not HardConstraint(nonlinear, global_solve="newton").takes_grid_basis
    assert HardConstraint(nonlinear).takes_grid_basis  # one Newton step: a linear system
