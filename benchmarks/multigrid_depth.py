"""FEMultigrid with hierarchies of different depth, on the same Darcy data and epochs.

A V-cycle carries information across the domain only as far as its coarsest level
reaches: a few smoothing steps of one-ring stencils there. On `unit_square(85)` the
nested refinements stop at a 22 x 22 coarsest mesh (84 = 4 x 21), so this script
measures what coarser, non-nested levels below it buy (FE interpolation between
any two meshes of the domain is a prolongation all the same).

Each hierarchy is written as vertices per side of its levels, coarsest first; a
level with 2 n - 1 vertices after one with n is that mesh refined (nested), any
other is `unit_square` of its own (not nested). The last must be the resolution.
`benchmarks/darcy.py` builds FEMultigrid's hierarchy by the depth found here.
Training is the Darcy benchmark's protocol (`benchmarks/darcy.py`), but for a fixed
number of epochs, so that the load of a shared machine cannot change the result.

    python benchmarks/multigrid_depth.py --resolution 33 --hierarchies 17,33 9,17,33 3,5,9,17,33
    python benchmarks/multigrid_depth.py --resolution 85 --hierarchies 22,43,85 11,22,43,85
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

from fenop.operators import FEMultigrid, FEOperator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from darcy import _fit, darcy_data, square_hierarchy  # the Darcy benchmark's pieces


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=33, help="vertices per side of the data")
    parser.add_argument(
        "--hierarchies",
        nargs="+",
        default=["17,33", "9,17,33", "3,5,9,17,33"],
        help="each: vertices per side of the levels, coarsest first",
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes generating the data")
    parser.add_argument("--data", type=Path, help="folder of the Darcy stores (default: temporary)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    n, device = args.resolution, torch.device(args.device)
    if args.epochs < 2:
        raise SystemExit(f"--epochs must be at least 2 (one warm-up epoch), got {args.epochs}")
    specs = [[int(s) for s in h.split(",")] for h in args.hierarchies]
    for spec in specs:
        if spec[-1] != n or min(spec) < 2:
            raise SystemExit(f"each hierarchy must end at --resolution {n}, got {spec}")
    with tempfile.TemporaryDirectory() as folder:
        folder = args.data or Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # The store and statistics of benchmarks/darcy.py.
        train, test, stats = darcy_data(folder, n, args.train, args.test, workers=args.workers)
        print(
            f"FEMultigrid depth: Darcy {args.train} train / {args.test} test at {n} x {n}, "
            f"{args.epochs} epochs, batch {args.batch}, lr {args.lr:g}, seed {args.seed}, "
            f"device {device} ({torch.get_num_threads()} threads)"
        )
        print(f"{'levels (vertices a side)':<28} {'params':>8} {'step ms':>8} {'test rel L2':>11}")
        results = {}
        for spec in specs:
            spaces = square_hierarchy(spec)
            torch.manual_seed(args.seed)
            processor = FEMultigrid(spaces, 1, 1, width=args.width, n_layers=4)
            model = FEOperator(train.space, train.space, processor, **stats).to(device)
            name = ",".join(map(str, spec))
            r = _fit(
                model, train, test, minutes=math.inf, epochs=args.epochs, device=device,
                batch=args.batch, lr=args.lr, seed=args.seed, name=name,
            )  # fmt: skip
            results[name] = r
            error = f"{r['error']:.4f}" if r["diverged_epoch"] is None else "diverged"
            print(f"{name:<28} {r['params']:>8} {r['step_ms']:>8.1f} {error:>11}", flush=True)
    return results


if __name__ == "__main__":
    main()
