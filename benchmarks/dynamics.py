"""Steppers side by side on one family of trajectories, at equal training time.

Data: ``--samples TRAIN TEST`` trajectories of a fenop family (``--pde``) on
``unit_square(R)`` (P1), each of ``4 H`` saved steps, ``H = --horizon``. Every model
maps the state u_n to u_{n+1} and trains on the windows of the first ``H`` steps of
the training trajectories for ``--seconds`` of wall clock (AdamW, weight decay 1e-4,
learning rate ``lr (1 + cos(π t / T)) / 2`` in elapsed time t, batches of 32,
gradients clipped to norm 1, the relative L2 loss). Each is then rolled out on the
test trajectories from their initial state for all ``4 H`` steps: four times the
horizon it was trained on.

Variants (``--variants``):

* ``neuralop-fno``: the anchor, plain ``neuralop.models.FNO`` on the R x R vertex
  grid (for P1 on this mesh the DOF values are the grid values), teacher forcing;
* ``fno``: fenop's FNO in ``FEOperator``, teacher forcing; ``fno-pushforward``: the
  pushforward trick over up to 2 calls (the first without gradients half the
  time); ``fno-unrolled``: backpropagation through 2 calls;
  ``fno-noise``: teacher forcing with input noise of 1 % of the state's deviation;
* ``fno-soft``: teacher forcing plus the step residual's norm (weight 1, the
  physics loss of :mod:`fenop.train.physics`);
* ``fno-hard``: the hard constraint per step, global Galerkin on 16 basis fields;
  ``fno-moe``: the two-level constraint, 16 experts of 8 fields;
  ``-linearised``: the same with the global solve of a nonlinear step linearised at
  the prediction (``global_solve = "linearised"``: one Newton step); ``-loose``:
  Newton's iterations to a tolerance of 1e-6 instead of 1e-10 (all of these the
  condition alone: ``smoothing = 0``, ``coarse_grid = 0``); ``-coarse``: the layers'
  default cycle around the solves, 4 smoothing sweeps and the grid of
  ``coarse_grid = "auto"`` (17 x 17 from R = 65 up, a quarter of the cells per
  axis below), for ``fno-hard`` (also ``-linearised`` and ``-loose``) and ``fno-moe``;
* ``fno-history2``: fenop's FNO given the last two states (``history = 2``; its
  rollout starts from the first two states, so it has no error after one step);
  ``fno-bundle2``: the next two states from one call (``bundle = 2``, temporal
  bundling: half the calls a rollout);
* ``mgno``, ``lsm``, ``femultigrid``: fenop's other processors in ``FEOperator``,
  teacher forcing, built as in ``benchmarks/darcy.py`` (MgNO's peak learning rate
  5e-4, its authors'; FEMultigrid on the nested hierarchy of ``square_levels``).

``-no-conserve`` (after any of the constraint variants' suffixes) turns off the
layers' exact conservation (``conserve = False``), which they impose where the
family's step conserves heat (``--option boundary=no_flux`` for heat; the table
then has the drift of ∫u over the rollout, relative to ∫|u_0|, worst over the test
trajectories).

``--grid G`` puts fenop's grid processors on a G x G grid whatever the mesh (the
anchor stays on the vertex grid): a fixed grid is what keeps a stepper's cost
from growing with the mesh.

Reported: the relative L2 error of the free-running rollout (mean over the test
trajectories) after 1, H, 2H and 4H steps, the step at which it first exceeds 10 %,
the teacher-forced one-step error, and the time of the batched rollout of every
test trajectory against scikit-fem's for the same steps (one trajectory after the
other, the family's own solver).

    python benchmarks/dynamics.py --pde heat --seconds 120
    python benchmarks/dynamics.py --pde allen_cahn --seconds 120
    python benchmarks/dynamics.py --pde allen_cahn --resolution 129 --grid 64 --timing --samples 1 8
    python benchmarks/dynamics.py --pde heat --option boundary=no_flux --variants fno fno-moe-coarse
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from darcy import _GridFNO, square_hierarchy, square_levels

from fenop.data import StepDataset, generate, read_store
from fenop.data.pdes import get_pde
from fenop.fem import RelativeL2Loss, unit_square
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO
from fenop.train import rollout
from fenop.train.physics import PhysicsLoss, build_constraint, constraint_table
from fenop.train.stepping import step_prediction

# Each family's step: saved states are solver steps (the constraint's scheme).
STEPS = {"heat": 0.0025, "allen_cahn": 0.1, "advection_diffusion": 0.05}
VARIANTS = (
    "neuralop-fno",
    "fno",
    "fno-pushforward",
    "fno-unrolled",
    "fno-noise",
    "fno-soft",
    "fno-hard",
    "fno-moe",
    "fno-hard-linearised",
    "fno-moe-linearised",
    "fno-hard-loose",
    "fno-moe-loose",
    "fno-hard-coarse",
    "fno-hard-coarse-linearised",
    "fno-hard-coarse-loose",
    "fno-moe-coarse",
    "fno-hard-no-conserve",
    "fno-moe-no-conserve",
    "fno-hard-coarse-no-conserve",
    "fno-moe-coarse-no-conserve",
    "fno-history2",
    "fno-bundle2",
    "mgno",
    "lsm",
    "femultigrid",
)
# peak learning rates other than 2e-3 (MgNO's authors' value, as in benchmarks/darcy.py)
LR = {"mgno": 5e-4}
# (history, bundle) other than (1, 1): the states a variant sees and predicts per call
SHAPES = {"fno-history2": (2, 1), "fno-bundle2": (1, 2)}


def _processor(variant: str, grid: int, n_basis: int, n: int):
    """The processor of a fenop variant, and its grid's resolution (``None`` off a grid)."""
    width = 32
    history, bundle = SHAPES.get(variant, (1, 1))
    if variant == "mgno":
        return MgNO(4, 1, grid=(grid, grid), width=width, n_layers=4), grid
    if variant == "lsm":
        return LSM(4, 1, width=width // 2, depth=4), grid
    if variant == "femultigrid":
        spaces = square_hierarchy(square_levels(n))
        return FEMultigrid(spaces, 1, 1, width=width, n_layers=4), None
    modes = min(12, grid // 2)
    # the encoder's 3 extra channels (mask, coordinates) beside the states
    fno = FNO(3 + history, bundle + n_basis, n_modes=(modes, modes), hidden_channels=width)
    return fno, grid


def _model(variant: str, space, n: int, stats, parameters: dict, pde: str, grid: int):
    modes, width = min(12, n // 2), 32
    if variant == "neuralop-fno":
        return _GridFNO(
            space,
            n,
            n_modes=(modes, modes),
            hidden_channels=width,
            input_stats=([float(stats[0].mean[0])], [float(stats[0].std[0])]),
            output_stats=([float(stats[1].mean[0])], [float(stats[1].std[0])]),
        )
    n_basis, constraint = 0, None
    if variant.startswith(("fno-hard", "fno-moe")):
        table = (
            {"kind": "global", "n_basis": 16}
            if variant.startswith("fno-hard")
            else {"kind": "moe", "n_basis": 8, "experts": 16}
        )
        if variant.endswith("-no-conserve"):
            table["conserve"] = False
            variant = variant.removesuffix("-no-conserve")
        if variant.endswith("-linearised"):
            table["global_solve"] = "linearised"
        if variant.endswith("-loose"):
            table["tolerance"] = 1e-6
        if "-coarse" not in variant:  # the condition alone; else the layers' default
            table.update(smoothing=0, coarse_grid=0)  # cycle: 4 sweeps, a 9 x 9 or 17 x 17 grid
        table = constraint_table(table)
        n_basis = table["n_basis"]
        description = {**table, "pde": pde, "parameters": parameters, "inputs": ["u_prev"]}
        constraint = build_constraint(description, space)
    processor, resolution = _processor(variant, grid, n_basis, n)
    return FEOperator(
        space,
        space,
        processor,
        resolution=resolution,
        input_stats=stats[0],
        output_stats=stats[1],
        constraint=constraint,
        constraint_inputs=["u_prev"],
    )


def _train(
    model, windows, space, *, history, seconds, mode, unroll, noise, physics, state_std, lr=2e-3
):
    """Train for ``seconds``; returns (steps, seconds)."""
    x, y = windows
    loss_fn = RelativeL2Loss(space)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    steps, start, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds:
        for items in torch.randperm(len(x), generator=generator).split(32):
            for group in optimiser.param_groups:
                group["lr"] = lr * (1 + math.cos(math.pi * min(elapsed / seconds, 1.0))) / 2
            optimiser.zero_grad(set_to_none=True)
            xb, yb = x[items], y[items]
            jitter = None
            if noise > 0:
                jitter = noise * state_std * torch.randn(xb[:, :1].shape, generator=generator)
            ahead = int(torch.randint(unroll, (), generator=generator))  # pushforward's j
            prediction, target = step_prediction(
                model, xb, yb, history=history, mode=mode, unroll=unroll, noise=jitter, ahead=ahead
            )
            loss = loss_fn(prediction, target)
            if physics is not None:
                loss = loss + physics(prediction, xb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {steps + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return steps, elapsed


def _timing(args, space, stats, parameters, trajectories, solver_s: float) -> dict:
    """The rollout of every test trajectory for 4H steps by each (untrained) model,
    against the solver's: how a stepper's cost compares, whatever its accuracy. An
    untrained constrained model's nonlinear solves may take more iterations than a
    trained one's (its prediction is a worse start): an upper bound for those."""
    n_test, steps = trajectories.shape[0], trajectories.shape[1] - 1
    print(
        f"{args.pde}, {args.resolution} x {args.resolution} P1 ({space.n_dofs} DOFs): "
        f"{n_test} rollouts of {steps} steps, batched, against scikit-fem's solves of the "
        f"same steps one trajectory after the other ({solver_s:.2f} s); untrained models; "
        f"fenop's grid {args.grid} x {args.grid}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print()
    print("| model | rollout s | faster than the solver |")
    print("|---|---:|---:|")
    results = {}
    for variant in args.variants:
        torch.manual_seed(0)
        model = _model(
            variant, space, args.resolution, stats, parameters, args.pde, args.grid
        ).eval()
        rollout(model, trajectories[:1, :1], 1)  # one-off set-up outside the clock
        start = time.perf_counter()
        rollout(model, trajectories[:, :1], steps)
        seconds = time.perf_counter() - start
        print(f"| {variant} | {seconds:.2f} | {solver_s / seconds:.1f}x |", flush=True)
        results[variant] = seconds
    return results


def _windows(steps: StepDataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [steps[i] for i in range(len(steps))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pde", choices=sorted(STEPS), default="heat")
    parser.add_argument("--resolution", type=int, default=33)
    parser.add_argument(
        "--grid", type=int, help="fenop's grid processors' grid (default: the resolution)"
    )
    parser.add_argument("--samples", type=int, nargs=2, default=(64, 16))
    parser.add_argument("--horizon", type=int, default=10, help="steps trained on (H)")
    parser.add_argument("--seconds", type=float, default=120.0, help="training time per model")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--data", type=Path, help="a folder to keep the data in")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the family (as for fenop generate), e.g. boundary=no_flux",
    )
    parser.add_argument(
        "--timing",
        action="store_true",
        help="only time the rollouts of untrained models against the solver",
    )
    args = parser.parse_args(argv)
    args.grid = args.grid or args.resolution
    torch.set_num_threads(torch.get_num_threads())
    n, (n_train, n_test), horizon = args.resolution, args.samples, args.horizon
    dt = STEPS[args.pde]
    folder = args.data or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    options = dict(option.split("=", 1) for option in args.option)
    tag = "".join(f"-{value}" for value in options.values())
    path = generate(
        args.pde,
        n_train + n_test,
        unit_square(n),
        seed=0,
        path=folder / f"{args.pde}{tag}-{n}-{n_train + n_test}-{4 * horizon}.h5",
        progress=False,
        n_steps=4 * horizon,
        t_final=4 * horizon * dt,
        trajectory=True,
        workers=2,
        **options,
    )
    store = read_store(path)
    parameters = store.header["parameters"]
    train = StepDataset(path, indices=range(n_train), horizon=horizon)
    test = StepDataset(path, indices=range(n_train, n_train + n_test))
    stats = train.normalizers()
    state_std = float(stats[0].std[0])
    space = train.space
    family = get_pde(args.pde)(space, **parameters)
    trajectories = test.trajectories(range(n_test))  # (n_test, 4H + 1, n)
    # training windows and their statistics by (history, bundle, calls)
    windows = {
        (1, 1, 1): (*_windows(train), stats),
        (1, 1, 2): (*_windows(train.unrolled(2)), stats),
    }

    # scikit-fem's rollout of the same steps, one trajectory after the other
    start = time.perf_counter()
    for u0 in trajectories[:, 0].double().numpy():
        family.solve(u0=u0)
    solver_s = time.perf_counter() - start
    if args.timing:
        return _timing(args, space, stats, parameters, trajectories, solver_s)

    print(
        f"{args.pde}, {n} x {n} P1 ({space.n_dofs} DOFs), {n_train} training trajectories "
        f"of H = {horizon} steps, {n_test} test trajectories of {4 * horizon}, dt = {dt}; "
        f"{args.seconds:g} s of training each; fenop's grid {args.grid} x {args.grid}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    print()
    conserved = len(space.boundary_dofs) == 0  # no-flux: ∫u is kept by every step
    print(
        "| model | steps | rollout L2 after 1 | H | 2H | 4H | > 10 % after | "
        "one step (teacher-forced) | rollout s (FE s) |" + (" drift of ∫u |" if conserved else "")
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if conserved else ""))
    mass = torch.from_numpy(np.asarray(space.mass_matrix.sum(axis=0))).float()
    loss = RelativeL2Loss(space, reduction="none")
    results = {}
    for variant in args.variants:
        torch.manual_seed(0)
        history, bundle = SHAPES.get(variant, (1, 1))
        mode = {"fno-pushforward": "pushforward", "fno-unrolled": "unrolled"}.get(
            variant, "one_step"
        )
        unroll = 2 if mode != "one_step" else 1
        shape = {"history": history, "bundle": bundle}
        if (history, bundle, unroll) not in windows:
            steps_of = StepDataset(path, indices=range(n_train), horizon=horizon, **shape)
            windows[history, bundle, unroll] = (*_windows(steps_of), steps_of.normalizers())
        *pairs, variant_stats = windows[history, bundle, unroll]
        model = _model(variant, space, n, variant_stats, parameters, args.pde, args.grid)
        physics = None
        if variant == "fno-soft":
            physics = PhysicsLoss(family.residual(), ["u_prev"])
        noise = 0.01 if variant == "fno-noise" else 0.0
        steps, _ = _train(
            model,
            pairs,
            space,
            history=history,
            seconds=args.seconds,
            mode=mode,
            unroll=unroll,
            noise=noise,
            physics=physics,
            state_std=state_std,
            lr=LR.get(variant, 2e-3),
        )
        model.eval()
        start = time.perf_counter()
        # from the first `history` true states: the states at times history .. 4H
        predicted = rollout(model, trajectories[:, :history], 4 * horizon - history + 1)
        rollout_s = time.perf_counter() - start
        x, y = _windows(StepDataset(path, indices=range(n_train, n_train + n_test), **shape))
        with torch.no_grad():
            free = torch.stack(
                [
                    loss(predicted[:, [t - history]], trajectories[:, [t]])
                    if t >= history
                    else torch.full((n_test,), math.nan)
                    for t in range(1, 4 * horizon + 1)
                ]
            )
            out = model(x)  # every test window, from true states
            forced = torch.stack([loss(out[:, [c]], y[:, [c]]) for c in range(bundle)])
        curve = free.mean(dim=1).numpy()  # (4H,) over the test trajectories
        above = np.nonzero(curve > 0.1)[0]
        reach = f"{above[0] + 1}" if len(above) else f"never ({4 * horizon})"
        cells = [
            "-" if math.isnan(curve[t - 1]) else f"{100 * curve[t - 1]:.2f} %"
            for t in (1, horizon, 2 * horizon, 4 * horizon)
        ]
        drift = ""
        if conserved:  # over the rollout, relative to ∫|u_0|, the worst trajectory
            heat = predicted @ mass.to(predicted.dtype)  # (n_test, 4H)
            first = trajectories[:, 0].to(predicted.dtype)
            change = (heat - (first @ mass)[:, None]).abs().amax(dim=1)
            drift = f" {(change / (first.abs() @ mass)).max().item():.1e} |"
        print(
            f"| {variant} | {steps} | {' | '.join(cells)} | {reach} | "
            f"{100 * forced.mean().item():.2f} % | {rollout_s:.2f} ({solver_s:.2f}) |{drift}",
            flush=True,
        )
        results[variant] = {"curve": curve, "steps": steps, "rollout_s": rollout_s}
    return results


if __name__ == "__main__":
    main()
