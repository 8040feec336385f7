"""Darcy flow: every fenop processor in FEOperator beside plain neuralop FNO, same data, same time.

Data: fenop's Darcy recipe (GRF thresholded to a = 12 / 3, f = 1, u = 0 on the
boundary) on `unit_square(R)`, P1. Plain FNO (`neuralop.models.FNO`, its default grid
embedding) trains on the DOF values laid out as an R x R grid (for P1 on this mesh
they are the same numbers); the fenop models train on the FE coefficients. All are
scored by the same FE relative L2 error on the test set, and each trains for the
same wall-clock budget: AdamW (weight decay 1e-4), one linear warm-up epoch, then a
cosine schedule per step sized from the first epoch's time, gradients clipped to
norm 1. The peak learning rate is 2e-3, except MgNO's: 5e-4, the value its authors
train with (at 2e-3 its chained 3x3 convolutions blow up within minutes).

FEMultigrid works on a hierarchy of meshes of the square (:func:`square_levels`):
halving the cells while it can, down to at most ``--coarsest`` vertices a side
(`benchmarks/multigrid_depth.py` measured that depth), refined meshes where the
number of cells is even and a mesh of its own where it is odd (not nested). Its
finest mesh has the data's vertices, numbered differently: its FEOperator permutes
the same data into it and back. ``--seed`` sets the models' initialisation and
batch order; the data are the same for every seed.

    python benchmarks/darcy.py                                  # CPU budget, see BENCHMARKS.md
    python benchmarks/darcy.py --resolution 85 --minutes 30     # the full recipe (GPU)
    python benchmarks/darcy.py --minutes 30 --seed 1            # another initialisation
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from neuralop.models import FNO as NeuralopFNO
from torch.utils.data import DataLoader

from fenop.data import FieldDataset, generate
from fenop.fem import FunctionSpace, RelativeL2Loss, unit_square
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO


class _GridFNO(torch.nn.Module):
    """Plain neuralop FNO on the R x R vertex grid, fed with and returning DOF vectors.

    It gets the same input normalisation and output scale as the fenop models, as
    neuraloperator's own Darcy pipeline normalises its data too.
    """

    def __init__(self, space, n: int, *, input_stats, output_stats, **options):
        super().__init__()
        index = np.rint(space.dof_points * (n - 1)).astype(np.int64)
        self.register_buffer("flat", torch.from_numpy(index[:, 0] * n + index[:, 1]))
        self.n = n
        (self.mean,), (self.std,) = input_stats
        (_,), (self.scale,) = output_stats
        self.net = NeuralopFNO(in_channels=1, out_channels=1, **options)

    def forward(self, x):
        grid = x.new_zeros(x.shape[0], 1, self.n * self.n)
        grid[..., self.flat] = (x - self.mean) / self.std
        out = self.net(grid.reshape(-1, 1, self.n, self.n)).reshape(-1, 1, self.n * self.n)
        return self.scale * out[..., self.flat]


def _models(names, space, spaces_mg, n, *, stats, width, seed):
    modes = min(12, n // 2)
    builders = {
        "neuralop-fno": lambda: _GridFNO(
            space, n, n_modes=(modes, modes), hidden_channels=width, **stats
        ),
        "fenop-fno": lambda: FEOperator(
            space,
            space,
            FNO(4, 1, n_modes=(modes, modes), hidden_channels=width),
            resolution=n,
            **stats,
        ),
        "fenop-mgno": lambda: FEOperator(
            space, space, MgNO(4, 1, grid=(n, n), width=width, n_layers=4), resolution=n, **stats
        ),
        "fenop-lsm": lambda: FEOperator(
            space, space, LSM(4, 1, width=width // 2, depth=4), resolution=n, **stats
        ),
        "fenop-femultigrid": lambda: FEOperator(
            space, space, FEMultigrid(spaces_mg, 1, 1, width=width, n_layers=4), **stats
        ),
    }
    for name in names:
        torch.manual_seed(seed)
        yield name, builders[name]()


def square_levels(n: int, *, coarsest: int = 11) -> list[int]:
    """Vertices a side of FEMultigrid's levels on ``unit_square(n)``, coarsest first.

    Each level has about half the cells of the next, down to at most ``coarsest``
    vertices a side (spacing 1/10 for 11: the best depth at 33 x 33 and at 85 x 85
    in BENCHMARKS.md).

    >>> square_levels(33), square_levels(85), square_levels(85, coarsest=22)
    ([9, 17, 33], [11, 22, 43, 85], [22, 43, 85])
    """
    sides = [n]
    while sides[0] > coarsest:
        cells = sides[0] - 1
        sides.insert(0, cells // 2 + 1 if cells % 2 == 0 else (cells + 1) // 2)
    return sides


def square_hierarchy(sides: list[int]) -> list[FunctionSpace]:
    """P1 spaces on the unit square with ``sides`` vertices a side, coarsest first.

    A level with ``2 m - 1`` vertices a side after one with ``m`` is that mesh
    refined (nested); any other is a ``unit_square`` of its own (not nested).

    >>> [s.n_dofs for s in square_hierarchy([3, 5, 9])]
    [9, 25, 81]
    """
    meshes = [unit_square(sides[0])]
    for coarse, n in itertools.pairwise(sides):
        meshes.append(meshes[-1].refined() if n == 2 * coarse - 1 else unit_square(n))
    return [FunctionSpace(m, dirichlet="boundary") for m in meshes]


def darcy_data(folder: Path, n: int, n_train: int, n_test: int, *, workers: int):
    """The recipe's train and test sets on ``unit_square(n)``, and the models' statistics.

    The store ``folder / darcy{n}.h5`` is generated (or completed) first. The
    statistics are the input's mean and standard deviation and, as the output
    scale, the root mean square of the training outputs.
    """
    total = n_train + n_test
    path = generate(
        "darcy", total, unit_square(n), seed=0, path=folder / f"darcy{n}.h5", workers=workers
    )
    train = FieldDataset(path, indices=range(n_train))
    test = FieldDataset(path, indices=range(n_train, total))
    a, u = train.normalizers()
    stats = {
        "input_stats": (a.mean.tolist(), a.std.tolist()),
        "output_stats": ([0.0], [float(math.sqrt(u.mean.item() ** 2 + u.std.item() ** 2))]),
    }
    return train, test, stats


# Peak learning rates; models not listed use the default.
_LR = {"fenop-mgno": 5e-4}
_DEFAULT_LR = 2e-3


def _clock(device) -> float:
    """Seconds, after the GPU's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fit(model, train, test, *, minutes, device, batch, lr, seed, name="model", epochs=None):
    """Train `model` for about `minutes` of wall clock; return its test error and timings.

    With ``epochs`` given it trains for exactly that many epochs instead (the cosine
    schedule sized from them, no time limit), for comparisons that a shared
    machine's load must not change.

    Progress (epoch, elapsed time, mean training loss) goes to stderr after the
    first epoch and then about once a minute, so that a long or interrupted run
    still shows how far it got; the table goes to stdout.
    """
    loss_fn = RelativeL2Loss(train.space).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=generator)
    batches = [(x.to(device), y.to(device)) for x, y in loader]  # small enough to hold
    start, epoch_times, schedule = time.perf_counter(), [], None
    step_times, diverged, reported = [], None, -math.inf
    fixed = epochs is not None
    while epochs is None or len(epoch_times) < epochs:
        t0, losses = _clock(device), []
        for x, y in batches:
            s0 = _clock(device)
            optimiser.zero_grad()
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):  # reported, not hidden: the model diverged
                diverged = len(epoch_times) + 1
                break
            loss.backward()
            # The same safeguards for every model: clipped gradients, a warm-up epoch.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if schedule is None:
                for group in optimiser.param_groups:
                    group["lr"] = lr * (len(step_times) + 1) / len(batches)
            optimiser.step()
            if schedule is not None:
                schedule.step()
            step_times.append(_clock(device) - s0)
            losses.append(loss.item())
        if diverged is not None:
            break
        epoch_times.append(_clock(device) - t0)
        if schedule is None:  # the first epoch warms up and sizes the cosine schedule
            # From its median step, not its duration: the first steps also pay for
            # one-off set-up (CUDA kernels and FFT plans), which cost plain FNO half
            # its budget on a GPU when the schedule was sized from the epoch's time.
            if not fixed:
                per_epoch = float(np.median(step_times)) * len(batches)
                epochs = max(2, 1 + int((60 * minutes - epoch_times[0]) / per_epoch))
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimiser, T_max=(epochs - 1) * len(batches)
            )
        elapsed = time.perf_counter() - start
        out_of_time = not fixed and elapsed > 60 * minutes * 1.05
        if elapsed - reported >= 60 or len(epoch_times) == epochs or out_of_time:
            reported = elapsed
            print(
                f"  {name}: epoch {len(epoch_times)}/{epochs}, {elapsed / 60:.1f} min, "
                f"train loss {np.mean(losses):.4f}",
                file=sys.stderr,
                flush=True,
            )
        if out_of_time:
            break
    x, y = next(iter(DataLoader(test, batch_size=len(test))))
    with torch.no_grad():
        error = RelativeL2Loss(test.space).to(device)(model(x.to(device)), y.to(device)).item()
    return {
        "error": error,
        "diverged_epoch": diverged,
        "epochs": len(epoch_times),
        "epoch_s": float(np.median(epoch_times)) if epoch_times else float("nan"),
        "step_ms": 1e3 * float(np.median(step_times)) if step_times else float("nan"),
        "params": sum(p.numel() for p in model.parameters()),
        "lr": lr,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=33, help="vertices per side")
    parser.add_argument(
        "--coarsest", type=int, default=11, help="most vertices a side of FEMultigrid's coarsest"
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument(
        "--models", default="neuralop-fno,fenop-fno,fenop-mgno,fenop-lsm,fenop-femultigrid"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes generating the data")
    parser.add_argument(
        "--data", type=Path, help="folder for the generated stores (default: temporary)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds initialisation and batch order; data stay fixed"
    )
    args = parser.parse_args(argv)
    n = args.resolution
    if n < 3 or args.coarsest < 2:
        raise SystemExit(f"need --resolution >= 3 and --coarsest >= 2, got {n}, {args.coarsest}")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        folder = args.data or Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        train, test, stats = darcy_data(folder, n, args.train, args.test, workers=args.workers)
        levels = square_levels(n, coarsest=args.coarsest)
        spaces_mg = square_hierarchy(levels)
        threads = torch.get_num_threads()
        print(
            f"darcy: {args.train} train / {args.test} test at {n} x {n} vertices, "
            f"{args.minutes} min per model, batch {args.batch}, seed {args.seed}, "
            f"device {device} ({platform.machine()}, {threads} threads); FEMultigrid levels "
            f"{', '.join(map(str, levels))} vertices a side"
        )
        columns = ("params", "lr", "epochs", "s/epoch", "step ms", "step / FNO", "test rel L2")
        print(f"{'model':<20} " + " ".join(f"{c:>{max(8, len(c))}}" for c in columns))
        results = {}
        models = _models(
            args.models.split(","),
            train.space,
            spaces_mg,
            n,
            stats=stats,
            width=args.width,
            seed=args.seed,
        )
        for name, model in models:
            r = _fit(
                model.to(device),
                train,
                test,
                minutes=args.minutes,
                device=device,
                batch=args.batch,
                lr=_LR.get(name, _DEFAULT_LR),
                seed=args.seed,
                name=name,
            )
            results[name] = r
            # Step time relative to plain FNO, when it ran in the same process.
            ratio = (
                f"{r['step_ms'] / results['neuralop-fno']['step_ms']:.2f}"
                if "neuralop-fno" in results
                else "-"
            )
            error = (
                f"{r['error']:>11.4f}"
                if r["diverged_epoch"] is None
                else f"diverged in epoch {r['diverged_epoch']}"
            )
            print(
                f"{name:<20} {r['params']:>8} {r['lr']:>8.0e} {r['epochs']:>8} "
                f"{r['epoch_s']:>8.2f} {r['step_ms']:>8.1f} {ratio:>10} "
                f"{error:>11}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
