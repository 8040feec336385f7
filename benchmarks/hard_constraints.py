"""The hard-constraint layer in training: what it costs as the mesh grows.

``accuracy``: the same FEOperator (FNO, 12 modes, 32 channels, on the mesh's
grid, or ``--grid 64`` a fixed 64 x 64 one; ``--processor femultigrid``: FEMultigrid,
width 16, 2 layers, on the mesh's hierarchy) trained on one generated data set (R x R
P1, 200 training and 50 test samples) in each way: unconstrained, soft (physics
loss, weights 0.01, 0.1 and 1),
global hard (Galerkin with N = --basis fields or 32, least squares), and experts
(MoE, METIS, overlap 2, 3 sweeps: K = 4, 16, 64 with the global coarse solve, K = 16
without it, K = 16 least squares), each for the same
wall-clock budget: AdamW on the relative L2 loss, as `fenop train`, with a cosine
schedule in the elapsed time, so that every variant's learning rate reaches zero
when its budget runs out, whatever its step costs; training stops at the first step
that ends past the budget. It reports the test relative L2 and H1 errors
against the FE solutions, the residual norm of the outputs (relative to the zero
field's), the epochs and the time per training step, the inference time per sample
and the number of expert unknowns over free DOFs (K N / n_free). ``--loss h1``
trains on the relative H1 loss instead of L2; the variants ``..., smoothing S``
add S damped Jacobi sweeps before and after the solves, ``..., coarse grid G`` a
Galerkin correction in the hat functions of a G x G grid after them (K N / n_free
then counts the grid's unknowns too); ``..., default`` the layers' defaults (4
sweeps and the grid of ``coarse_grid="auto"``); every other variant has neither.

``scaling``: one training step (forward, backward, optimiser) of the same
FEOperator (FNO, 12 modes, 32 channels, on a 64 x 64 grid or, ``--grid mesh``, an
R x R one) on R x R P1 meshes: unconstrained, soft (the physics loss, weight 0.1),
with the global Galerkin constraint, and with experts (MoE, two-level Galerkin,
METIS, overlap 2, 3 sweeps; K fixed, and K growing with the mesh at a fixed number
of DOFs per expert), N = 16 basis fields; and "basis only", no constraint but what
every one of them costs at least: the N extra fields emitted, decoded, combined
with fixed weights and given their gradient. Each configuration runs in a process of
its own, which reports the median step time over ``--steps`` steps after one
warm-up step, and the peak resident memory those steps added (the process's peak
minus its size before the first step). Beside them, scikit-fem's solve of one
sample (the data generator's).

``layer``: the constraint layer alone on one batch (a guess 5 % off the solutions,
random basis fields): its forward pass without gradients (what inference costs),
with them, and the backward pass; and what bounds them: one sparse product with
the batch's ``J`` (float32 and float64, the GB/s it moves) against a copy's GB/s,
and each variant's forward and backward passes in units of that float32 product.

    python benchmarks/hard_constraints.py accuracy --pde darcy --seconds 60
    python benchmarks/hard_constraints.py accuracy --resolution 129 --grid 64 \
        --samples 250 40 --seconds 150 --variants unconstrained "global, Galerkin, N=32"
    python benchmarks/hard_constraints.py accuracy --pde nonlinear_diffusion --seconds 60
    python benchmarks/hard_constraints.py accuracy --seconds 180 --variants unconstrained \
        "global, Galerkin" "MoE K=64, two-level Galerkin"
    python benchmarks/hard_constraints.py scaling --pde darcy
    python benchmarks/hard_constraints.py scaling --pde darcy --grid mesh
    python benchmarks/hard_constraints.py scaling --pde nonlinear_diffusion --resolutions 33 65
    python benchmarks/hard_constraints.py layer --pde darcy --resolution 225
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fenop._allocator import keep_freed_memory
from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, RelativeH1Loss, RelativeL2Loss, unit_square
from fenop.fem.jacobian import JacobianPattern
from fenop.fem.sparse import csr_product
from fenop.operators import FNO, FEMultigrid, FEOperator, HardConstraint, MoEConstraint
from fenop.train.physics import PhysicsLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constraint_inference import _median_time  # the inference benchmark's timer
from darcy import square_hierarchy, square_levels  # the Darcy benchmark's pieces

_INPUT = {"darcy": "a", "nonlinear_diffusion": "f"}

# The variants as measured before the layers' default cycle: the condition alone
# (for a residual that is not affine, Newton's root) unless a variant names its
# sweeps and grid.
PLAIN = {"smoothing": 0, "coarse_grid": 0, "global_solve": "newton"}
_VARIANTS = (
    "unconstrained",
    "soft",
    "basis only",
    "global",
    "moe K=16",
    "moe K=64",
    "moe 400 DOFs/expert",
    "moe K=16 newton",
    "global smoothing 4 coarse 17",
    "global default",
    "global default linearised",
    "global default linearised frozen",
    "global default newton",
)


class _BasisOnly(torch.nn.Module):
    """Not a constraint: the least that any constraint layer costs, for scale. The
    processor emits the N basis fields, the decoder interpolates them, the output is
    ``g + Φ w`` with fixed ``w`` (the fields' mean), and the backward pass sends a
    gradient to every field; no residual, no solve, no float64."""

    def __init__(self, residual):
        super().__init__()
        self.space = residual.forms.space

    def forward(self, prediction, basis, **inputs):
        return prediction + basis.mean(dim=1, keepdim=True)


def _constraint(variant: str, residual):
    if variant in ("unconstrained", "soft"):
        return None
    if variant == "basis only":
        return _BasisOnly(residual)
    if variant == "global":
        return HardConstraint(residual, **PLAIN)
    if variant == "global smoothing 4 coarse 17":
        return HardConstraint(residual, smoothing=4, coarse_grid=17)
    if variant == "global default":  # the grid "auto" sizes by the mesh
        return HardConstraint(residual)
    if variant == "global default linearised":  # a nonlinear residual's one Newton step
        return HardConstraint(residual, global_solve="linearised")
    if variant == "global default newton":  # the default before "auto" (Newton's root)
        return HardConstraint(residual, global_solve="newton")
    if variant == "global default linearised frozen":
        return HardConstraint(residual, global_solve="linearised", frozen_jacobian=True)
    if variant.endswith("DOFs/expert"):
        return MoEConstraint(
            residual, MetisPartition(dofs_per_expert=int(variant.split()[1])), **PLAIN
        )
    # "moe K=16 newton": the experts each solving their nonlinear problem by Newton's method
    experts, *how = variant.split("=")[1].split()
    options = {"nonlinear": "newton"} if how else {}
    return MoEConstraint(residual, MetisPartition(experts=int(experts)), **options, **PLAIN)


def _experts(constraint) -> int:
    """The experts of a constraint layer: K for MoE, 1 for the global solve, 0 for
    none (no constraint, or the basis alone)."""
    if not isinstance(constraint, (HardConstraint, MoEConstraint)):
        return 0
    return getattr(getattr(constraint, "partition", None), "n_experts", 1)


_ACCURACY = {
    "unconstrained": None,
    "soft (physics weight 0.01)": None,
    "soft (physics weight 0.1)": None,
    "soft (physics weight 1)": None,
    "global, Galerkin": lambda r: HardConstraint(r, **PLAIN),
    "global, Galerkin, N=32": lambda r: HardConstraint(r, **PLAIN),
    "global, least squares": lambda r: HardConstraint(r, condition="least_squares", **PLAIN),
    "MoE K=4, two-level Galerkin": lambda r: MoEConstraint(r, MetisPartition(experts=4), **PLAIN),
    "MoE K=16, two-level Galerkin": lambda r: MoEConstraint(r, MetisPartition(experts=16), **PLAIN),
    "MoE K=64, two-level Galerkin": lambda r: MoEConstraint(r, MetisPartition(experts=64), **PLAIN),
    "MoE K=16, two-level Galerkin, experts by Newton": lambda r: MoEConstraint(
        r, MetisPartition(experts=16), nonlinear="newton", **PLAIN
    ),
    "MoE K=16, Galerkin, no coarse solve": lambda r: MoEConstraint(
        r, MetisPartition(experts=16), coarse=False, **PLAIN
    ),
    "MoE K=16, two-level least squares": lambda r: MoEConstraint(
        r, MetisPartition(experts=16), condition="least_squares", **PLAIN
    ),
    # Damped Jacobi sweeps of the FE system before and after the solves
    # (benchmarks/constraint_at_scale.py measures why)
    "global, Galerkin, smoothing 4": lambda r: HardConstraint(r, smoothing=4, coarse_grid=0),
    "global, Galerkin, N=32, smoothing 2": lambda r: HardConstraint(r, smoothing=2, coarse_grid=0),
    "global, Galerkin, N=32, smoothing 4": lambda r: HardConstraint(r, smoothing=4, coarse_grid=0),
    "global, Galerkin, N=32, smoothing 8": lambda r: HardConstraint(r, smoothing=8, coarse_grid=0),
    "MoE K=16, two-level Galerkin, smoothing 4": lambda r: MoEConstraint(
        r, MetisPartition(experts=16), smoothing=4, coarse_grid=0
    ),
    "MoE 4000 DOFs/expert, two-level Galerkin, smoothing 4": lambda r: MoEConstraint(
        r, MetisPartition(dofs_per_expert=4000), smoothing=4, coarse_grid=0
    ),
    # and a coarse grid's Galerkin correction after the solve: a two-grid cycle from
    # the network's output whose coarse space is the basis and the grid's hats
    "global, Galerkin, N=32, smoothing 4, coarse grid 17": lambda r: HardConstraint(
        r, smoothing=4, coarse_grid=17
    ),
    "global, Galerkin, N=32, smoothing 4, coarse grid 33": lambda r: HardConstraint(
        r, smoothing=4, coarse_grid=33
    ),
    "global, Galerkin, N=8, smoothing 4, coarse grid 17": lambda r: HardConstraint(
        r, smoothing=4, coarse_grid=17
    ),
    "MoE 4000 DOFs/expert, two-level Galerkin, smoothing 4, coarse grid 17": lambda r: (
        MoEConstraint(r, MetisPartition(dofs_per_expert=4000), smoothing=4, coarse_grid=17)
    ),
    # the same on a 33 x 33 mesh: a grid of a quarter of its cells per axis
    "global, Galerkin, N=32, smoothing 4, coarse grid 9": lambda r: HardConstraint(
        r, smoothing=4, coarse_grid=9
    ),
    "MoE K=64, two-level Galerkin, smoothing 4, coarse grid 9": lambda r: MoEConstraint(
        r, MetisPartition(experts=64), smoothing=4, coarse_grid=9
    ),
    # the layers' defaults: 4 sweeps and a grid sized by the mesh (coarse_grid="auto")
    "global, default, N=32": lambda r: HardConstraint(r),
    "global, default, N=8": lambda r: HardConstraint(r),
    "global, default, N=8, linearised": lambda r: HardConstraint(r, global_solve="linearised"),
    # the gradient through the cycle's stages with J(u) held fixed
    "global, default, N=8, linearised, frozen J": lambda r: HardConstraint(
        r, global_solve="linearised", frozen_jacobian=True
    ),
    "global, default, N=8, frozen J": lambda r: HardConstraint(
        r, global_solve="newton", frozen_jacobian=True
    ),
    # for a residual that is not affine, "auto" takes "linearised" unless it is a
    # time step; this was the default before
    "global, default, N=8, newton": lambda r: HardConstraint(r, global_solve="newton"),
    # the grids "auto" takes on 257 x 257 and 513 x 513 meshes, measured against the
    # 17 x 17 it was capped at before (BENCHMARKS.md, "The coarse grid as the mesh grows")
    "global, default, N=8, coarse grid 24": lambda r: HardConstraint(r, coarse_grid=24),
    "global, default, N=8, coarse grid 33": lambda r: HardConstraint(r, coarse_grid=33),
    # fewer sweeps: half the cycle's sparse products
    "global, default, N=8, smoothing 2": lambda r: HardConstraint(r, smoothing=2),
    "global, default, N=32, smoothing 2": lambda r: HardConstraint(r, smoothing=2),
    "MoE K=64, default": lambda r: MoEConstraint(r, MetisPartition(experts=64)),
    "MoE 64 DOFs/expert, default": lambda r: MoEConstraint(r, MetisPartition(dofs_per_expert=64)),
    "MoE 256 DOFs/expert, default": lambda r: MoEConstraint(r, MetisPartition(dofs_per_expert=256)),
    "MoE 1000 DOFs/expert, default": lambda r: MoEConstraint(
        r, MetisPartition(dofs_per_expert=1000)
    ),
    "MoE 4000 DOFs/expert, default": lambda r: MoEConstraint(
        r, MetisPartition(dofs_per_expert=4000)
    ),
}


# what the header lines say of the allocator (as the `fenop` command: keep_freed_memory)
_ALLOCATOR = ["the default allocator"]


def _accuracy(args) -> dict:
    from fenop.data import FieldDataset, generate

    name = _INPUT[args.pde]
    n_train, n_test = args.samples
    grid = args.resolution if args.grid == "mesh" else int(args.grid)
    path = generate(
        args.pde,
        n_train + n_test,
        unit_square(args.resolution),
        seed=0,
        path=args.data / f"{args.pde}_{args.resolution}_{n_train + n_test}.h5",
        progress=False,
    )
    train = FieldDataset(path, inputs=[name], indices=range(n_train))
    test = FieldDataset(path, inputs=[name], indices=range(n_train, n_train + n_test))
    space = train.space
    residual = get_pde(args.pde)(space).residual()
    physics = PhysicsLoss(residual, [name])
    stats = dict(zip(("input_stats", "output_stats"), train.normalizers(), strict=True))
    free = int((~residual.dirichlet).sum())
    x_train, y_train = (
        torch.stack(t) for t in zip(*(train[i] for i in range(n_train)), strict=True)
    )
    x_test, y_test = (torch.stack(t) for t in zip(*(test[i] for i in range(n_test)), strict=True))
    processor = f"FNO on a {grid} x {grid} grid"
    if args.processor == "femultigrid":
        # the store's own space as the finest level, so that no interpolation enters
        sides = square_levels(args.resolution)
        levels = [*square_hierarchy(sides[:-1]), space]
        processor = f"FEMultigrid on {' -> '.join(f'{n} x {n}' for n in sides)}"
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{_ALLOCATOR[0]}; "
        f"{args.pde} {args.resolution} x {args.resolution} P1, {space.n_dofs} DOFs, "
        f"{n_train} / {n_test} samples, N = {args.basis}, batch {args.batch}, "
        f"{processor}, {args.loss.upper()} loss, {args.seconds:g} s of training each"
    )
    print(
        "| variant | K N / n_free | epochs | ms / step | test rel. L2 | test rel. H1 | residual "
        "| inference (ms / sample) | failed solves |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for variant in args.variants:
        make = _ACCURACY[variant]
        torch.manual_seed(0)  # the same initial weights for every variant
        constraint = make(residual) if make is not None else None
        # N from the variant's name where it gives one ("..., N=32"), else --basis
        given = re.search(r"N=(\d+)", variant)
        n_basis = int(given.group(1)) if given else args.basis
        out = 1 + (n_basis if constraint is not None else 0)
        extra = {"constraint": constraint, "constraint_inputs": (name,)} if constraint else {}
        if args.processor == "femultigrid":  # on the mesh hierarchy itself: no grid
            processor = FEMultigrid(levels, 1, out, width=16, n_layers=2)
            model = FEOperator(space, space, processor, **stats, **extra)
        else:
            processor = FNO(4, out, n_modes=(12, 12), hidden_channels=32)
            model = FEOperator(space, space, processor, resolution=grid, **stats, **extra)
        weight = float(variant.split("weight ")[1][:-1]) if variant.startswith("soft") else 0.0
        steps, seconds = _train_for(
            model,
            x_train,
            y_train,
            seconds=args.seconds,
            batch=args.batch,
            physics=physics if weight else None,
            weight=weight,
            loss=args.loss,
        )
        model.eval()
        with torch.no_grad():
            begin = time.perf_counter()
            prediction = model(x_test)
            inference = (time.perf_counter() - begin) / n_test
            error = RelativeL2Loss(space)(prediction, y_test).item()
            error_h1 = RelativeH1Loss(space)(prediction, y_test).item()
            residual_norm = physics(prediction.double(), x_test.double()).item()
        report = getattr(constraint, "report", None)
        failed = int((~report["converged"]).sum()) if report else 0
        ratio = "-"
        if constraint is not None:
            coarse = constraint.coarse_space
            unknowns = _experts(constraint) * n_basis + (coarse.size if coarse else 0)
            ratio = f"{unknowns / free:.2g}"
        epochs = steps * args.batch / n_train
        results[variant] = {
            "test_l2": error,
            "test_h1": error_h1,
            "seconds": seconds,
            "steps": steps,
        }
        print(
            f"| {variant} | {ratio} | {epochs:.1f} | {1000 * seconds / steps:.0f} | "
            f"{error:.4f} | {error_h1:.4f} | {residual_norm:.1e} | {1000 * inference:.1f} | "
            f"{failed} / {n_test} |",
            flush=True,
        )
    return results


def _train_for(
    model, x, y, *, seconds, batch, physics, weight, lr=1e-3, loss="l2"
) -> tuple[int, float]:
    """Train ``model`` on ``(x, y)``, ``(n, C, n_dofs)``, for ``seconds`` of wall clock.

    AdamW (weight decay 1e-4) on the relative L2 (or ``loss="h1"``: H1) loss (plus ``weight`` times
    ``physics``), batches drawn in a shuffled order each epoch (seeded); the learning
    rate at elapsed time t is ``lr (1 + cos(pi t / seconds)) / 2``, a cosine schedule
    in time rather than in steps, so that a variant whose steps cost more takes fewer
    of them over the same schedule instead of training past the budget or stopping
    short of it. Stops at the first step that ends past the budget. Returns the steps
    taken and the seconds they took.
    """
    loss_fn = (RelativeH1Loss if loss == "h1" else RelativeL2Loss)(model.space_out)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    steps, start, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds:
        order = torch.randperm(len(x), generator=generator)
        for items in order.split(batch):
            for group in optimiser.param_groups:
                group["lr"] = lr * (1 + math.cos(math.pi * min(elapsed / seconds, 1.0))) / 2
            optimiser.zero_grad(set_to_none=True)
            prediction = model(x[items])
            loss = loss_fn(prediction, y[items])
            if physics is not None:
                loss = loss + weight * physics(prediction, x[items])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {steps + 1}")
            loss.backward()
            optimiser.step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return steps, elapsed


def _training_step(model, x, y, physics, weight):
    """A function that takes one Adam step of ``model`` on ``(x, y)`` (mean squared
    error, plus ``weight`` times the physics loss when one is given) and returns its
    wall-clock seconds."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        begin = time.perf_counter()
        optimiser.zero_grad()
        out = model(x)
        loss = ((out - y) ** 2).mean()
        if physics is not None:
            loss = loss + weight * physics(out.double(), x.double())
        loss.backward()
        optimiser.step()
        return time.perf_counter() - begin

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _step(args) -> dict:
    """One configuration, in this process: the JSON line the parent reads."""
    torch.manual_seed(0)
    space = FunctionSpace(unit_square(args.resolution), dirichlet="boundary")
    family = get_pde(args.pde)(space)
    start = time.perf_counter()
    samples = [family.sample(0, i) for i in range(args.batch)]
    solve_seconds = (time.perf_counter() - start) / args.batch
    name = _INPUT[args.pde]
    x = torch.stack([torch.from_numpy(s[name]) for s in samples])[:, None].float()
    y = torch.stack([torch.from_numpy(s["u"]) for s in samples])[:, None].float()
    constraint = _constraint(args.variant, family.residual())
    out = 1 + (args.basis if constraint is not None else 0)
    grid = 64 if args.grid == "64" else args.resolution
    processor = FNO(4, out, n_modes=(12, 12), hidden_channels=32)
    extra = {"constraint": constraint, "constraint_inputs": (name,)} if constraint else {}
    # Statistics of the batch, so the network's outputs have the solution's size, as a
    # trained model's do.
    stats = {
        "input_stats": ([x.mean().item()], [x.std().item()]),
        "output_stats": ([y.mean().item()], [y.std().item()]),
    }
    model = FEOperator(space, space, processor, resolution=grid, **stats, **extra)
    physics = PhysicsLoss(family.residual(), [name]) if args.variant == "soft" else None
    step = _training_step(model, x, y, physics, 0.1)

    before = _rss_bytes()
    step()  # warm-up: first-use allocations and kernels
    times = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = getattr(constraint, "report", {}) if constraint is not None else {}
    return {
        "dofs": space.n_dofs,
        "step": statistics.median(times),
        "memory": max(peak - before, 0),
        "solve": solve_seconds,
        "experts": _experts(constraint),
        "converged": bool(report["converged"].all()) if report else True,
    }


def _layer(args) -> None:
    """The constraint layer alone on one batch of samples: its forward pass without
    gradients (inference) and with them, and the backward pass, medians of
    ``--steps`` calls after one; a guess 5 % off the solutions and random basis
    fields of their size."""
    space = FunctionSpace(unit_square(args.resolution), dirichlet="boundary")
    family = get_pde(args.pde)(space)
    name = _INPUT[args.pde]
    samples = [family.sample(0, i) for i in range(args.batch)]
    x = torch.stack([torch.from_numpy(s[name]) for s in samples]).float()
    u = torch.stack([torch.from_numpy(s["u"]) for s in samples]).float()
    generator = torch.Generator().manual_seed(0)
    guess = (u + 0.05 * u.std() * torch.randn(u.shape, generator=generator))[:, None]
    basis = torch.randn(args.batch, args.basis, space.n_dofs, generator=generator) * u.std()
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{_ALLOCATOR[0]}; "
        f"{args.pde} {args.resolution} x {args.resolution} P1, {space.n_dofs} DOFs, "
        f"batch {args.batch}, N = {args.basis}"
    )
    product = _bandwidth(space, args.batch)
    print("| variant | forward, no gradient (s) | forward (s) | backward (s) | in J products |")
    print("|---|---:|---:|---:|---:|")
    for variant in args.variants:
        layer = _constraint(variant, family.residual())
        inference, forward, backward = [], [], []
        for _ in range(args.steps + 1):
            with torch.no_grad():
                begin = time.perf_counter()
                layer(guess, basis, **{name: x})
                inference.append(time.perf_counter() - begin)
            g, phi = guess.clone().requires_grad_(), basis.clone().requires_grad_()
            begin = time.perf_counter()
            loss = layer(g, phi, **{name: x}).square().sum()
            middle = time.perf_counter()
            loss.backward()
            forward.append(middle - begin)
            backward.append(time.perf_counter() - middle)
        medians = [statistics.median(t[1:]) for t in (inference, forward, backward)]
        products = (medians[1] + medians[2]) / product
        print(
            f"| {variant} | " + " | ".join(f"{t:.3f}" for t in medians) + f" | {products:.0f} |",
            flush=True,
        )


def _bandwidth(space, batch: int) -> float:
    """Prints what one sparse product with ``J`` for ``batch`` samples costs (the
    block-diagonal CSR matrix the layers multiply by, int32 indices), in float32 and
    float64, and the GB/s it moves (entries, column indices, the vector read and the
    result written) against a copy of 100 MB (read and written); returns the float32
    product's seconds. Each timing is the median of 14 calls after one."""
    pattern = JacobianPattern(space)
    source = torch.randn(25_000_000)
    target = torch.empty_like(source)
    target.copy_(source)
    copy = _median_time(lambda: target.copy_(source), 14)
    print(f"# a copy of {source.nbytes / 1e6:.0f} MB: {2 * source.nbytes / copy / 1e9:.1f} GB/s")
    seconds = {}
    for dtype in (torch.float32, torch.float64):
        values = torch.randn(batch, pattern.nnz, dtype=dtype)
        matrix = pattern.pattern.block(values)
        x = torch.randn(batch * space.n_dofs, dtype=dtype)
        csr_product(matrix, x)
        seconds[dtype] = _median_time(lambda m=matrix, x=x: csr_product(m, x), 14)
        moved = values.numel() * (values.element_size() + 4) + 2 * x.nbytes
        print(
            f"# J x for {batch} samples ({values.numel() / 1e6:.1f}M entries), {dtype}: "
            f"{1000 * seconds[dtype]:.2f} ms, {moved / seconds[dtype] / 1e9:.1f} GB/s"
        )
    return seconds[torch.float32]


def _scaling(args) -> None:
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{_ALLOCATOR[0]}; "
        f"{args.pde}, batch {args.batch}, N = {args.basis}, FNO on "
        + ("a 64 x 64 grid" if args.grid == "64" else "an R x R grid")
    )
    print(
        "| R x R | DOFs | variant | experts | step (s) | x unconstrained | "
        "memory (MB) | scikit-fem solve (s) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for resolution in args.resolutions:
        base = None
        for variant in args.variants:
            command = [
                sys.executable,
                __file__,
                "_step",
                f"--pde={args.pde}",
                f"--resolution={resolution}",
                f"--variant={variant}",
                f"--batch={args.batch}",
                f"--basis={args.basis}",
                f"--steps={args.steps}",
                f"--grid={args.grid}",
                *(["--default-allocator"] if args.default_allocator else []),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                last = done.stderr.strip().splitlines()[-1:] or ["?"]
                print(f"| {resolution} | | {variant} | | failed: {last[0]} | | | |")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            base = row["step"] if variant == "unconstrained" else base
            ratio = f"{row['step'] / base:.2f}" if base else ""
            flag = "" if row["converged"] else " (not converged)"
            print(
                f"| {resolution} | {row['dofs']} | {variant}{flag} | {row['experts']} | "
                f"{row['step']:.3f} | {ratio} | {row['memory'] / 2**20:.0f} | "
                f"{row['solve']:.3f} |",
                flush=True,
            )


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    accuracy = commands.add_parser("accuracy", help="each variant trained for one budget")
    accuracy.add_argument("--pde", default="darcy", choices=sorted(_INPUT))
    accuracy.add_argument("--resolution", type=int, default=33, help="vertices a side")
    accuracy.add_argument("--seconds", type=float, default=60.0, help="training per variant")
    accuracy.add_argument(
        "--samples", type=int, nargs=2, default=[200, 50], metavar=("TRAIN", "TEST")
    )
    accuracy.add_argument("--batch", type=int, default=8)
    accuracy.add_argument("--basis", type=int, default=16, help="N, the basis fields")
    accuracy.add_argument("--data", type=Path, default=Path("runs/hard_constraints"))
    accuracy.add_argument("--loss", default="l2", choices=["l2", "h1"], help="training loss")
    accuracy.add_argument(
        "--grid", default="mesh", help="the FNO's grid: R x R (mesh, default) or N x N (N)"
    )
    accuracy.add_argument(
        "--processor",
        default="fno",
        choices=["fno", "femultigrid"],
        help="FNO on --grid, or FEMultigrid (width 16, 2 layers) on the mesh's hierarchy",
    )
    accuracy.add_argument(
        "--variants", nargs="+", default=list(_ACCURACY), choices=list(_ACCURACY), metavar="NAME"
    )
    scaling = commands.add_parser("scaling", help="step time and memory as the mesh grows")
    scaling.add_argument("--resolutions", type=int, nargs="+", default=[33, 65, 129, 225, 317])
    scaling.add_argument("--variants", nargs="+", default=list(_VARIANTS), choices=_VARIANTS)
    layer = commands.add_parser("layer", help="the constraint layer alone, forward and backward")
    layer.add_argument("--resolution", type=int, default=225, help="vertices a side")
    layer.add_argument("--variants", nargs="+", default=list(_VARIANTS[3:]), choices=_VARIANTS[3:])
    step = commands.add_parser("_step")  # one configuration; run by `scaling`
    step.add_argument("--resolution", type=int, required=True)
    step.add_argument("--variant", required=True, choices=_VARIANTS)
    for sub in (scaling, layer, step):
        sub.add_argument("--pde", default="darcy", choices=sorted(_INPUT))
        sub.add_argument("--batch", type=int, default=4)
        sub.add_argument("--basis", type=int, default=16, help="N, the basis fields")
        sub.add_argument("--steps", type=int, default=3)
        sub.add_argument(
            "--grid", default="64", choices=["64", "mesh"], help="the FNO's grid: 64 or R x R"
        )
    for sub in (accuracy, scaling, layer, step):
        sub.add_argument(
            "--default-allocator",
            action="store_true",
            help="leave glibc returning freed memory to the system (fenop's command keeps it)",
        )
    args = parser.parse_args(argv)
    if not args.default_allocator and keep_freed_memory():
        _ALLOCATOR[0] = "glibc keeping freed memory"
    if args.command == "_step":
        print(json.dumps(_step(args)))
    elif args.command == "layer":
        _layer(args)
    elif args.command == "accuracy":
        args.data.mkdir(parents=True, exist_ok=True)
        return _accuracy(args)
    else:
        _scaling(args)


if __name__ == "__main__":
    main()
