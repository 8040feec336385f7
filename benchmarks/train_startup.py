"""``fenop train``'s start-up to its first step, and each processor's training step.

Start-up is the time from calling ``train_from_config`` (imports done) to the first
optimiser step: reading the configuration, opening and checking the store, fitting
the normaliser, building the model and the trainer. It also counts how often the
store file is opened and how many ``FunctionSpace``s are built on the way. The step
is forward + loss + backward + AdamW step of an ``FEOperator`` around each processor
on one batch.

Several source trees can be compared side by side (``--tree`` repeated, e.g. a
``git worktree`` of an older commit): each measurement runs in a fresh process that
imports fenop from that tree, and the trees take turns round by round, so machine
noise hits them alike.

    python benchmarks/train_startup.py                                  # this tree
    git worktree add /tmp/before 25c4baf
    python benchmarks/train_startup.py --tree /tmp/before --tree .      # before / after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROCESSORS = ("fno", "mgno", "lsm", "femultigrid")


def _startup(store: str, resolution: int, n_train: int, n_test: int) -> dict:
    """Seconds from ``train_from_config`` to the first optimiser step, with counts."""
    import h5py
    import torch

    import fenop.fem.space
    from fenop.train.run import train_from_config

    class _FirstStep(Exception):
        pass

    counts = {"store_opens": 0, "spaces_built": 0}
    h5_init, space_init = h5py.File.__init__, fenop.fem.space.FunctionSpace.__init__

    def counting_open(self, name, *args, **kwargs):
        # (h5py also calls it with an existing file's id, to wrap that file again)
        if isinstance(name, str | os.PathLike) and os.fspath(name) == store:
            counts["store_opens"] += 1
        h5_init(self, name, *args, **kwargs)

    def counting_space(self, *args, **kwargs):
        counts["spaces_built"] += 1
        space_init(self, *args, **kwargs)

    def first_step(self, *args, **kwargs):
        raise _FirstStep

    h5py.File.__init__ = counting_open
    fenop.fem.space.FunctionSpace.__init__ = counting_space
    torch.optim.AdamW.zero_grad = first_step  # the first thing a training step does
    folder = Path(tempfile.mkdtemp())
    config = folder / "run.toml"
    config.write_text(
        f'[data]\npath = "{store}"\nn_train = {n_train}\nn_test = {n_test}\n'
        f'[model]\nprocessor = "fno"\nresolution = {resolution}\n'
        "[model.options]\nn_modes = [12, 12]\nhidden_channels = 16\n"
        f'[training]\nepochs = 1\nbatch_size = 10\noutput = "{folder / "run"}"\n'
        'device = "cpu"\n'
    )
    start = time.perf_counter()
    try:
        train_from_config(config, progress=False)
    except _FirstStep:
        pass
    return {"seconds": time.perf_counter() - start, **counts}


def _step(processor: str, resolution: int, batch: int, steps: int) -> dict:
    """Median seconds of a training step of ``FEOperator`` around ``processor``."""
    import torch

    from fenop.fem import FunctionSpace, RelativeL2Loss, unit_square
    from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO

    try:
        from fenop.fem import hierarchy
    except ImportError:  # fenop before the hierarchy moved to the FE layer
        from fenop.operators import hierarchy

    torch.manual_seed(0)
    space = FunctionSpace(unit_square(resolution), dirichlet="boundary")
    grid = (resolution - 1, resolution - 1)
    if processor == "femultigrid":
        coarse = (resolution - 1) // 4 + 1  # two refinements reach the data's mesh
        spaces = hierarchy(unit_square(coarse), 3)
        model = FEOperator(space, space, FEMultigrid(spaces, 1, 1, width=16, n_layers=2))
    else:
        inner = {
            "fno": lambda: FNO(4, 1, n_modes=(12, 12), hidden_channels=16),
            "mgno": lambda: MgNO(4, 1, grid=grid, width=16, n_layers=2),
            "lsm": lambda: LSM(4, 1, width=16, depth=4),
        }[processor]()
        model = FEOperator(space, space, inner, resolution=grid)
    x = torch.randn(batch, 1, space.n_dofs)
    y = torch.randn(batch, 1, space.n_dofs)
    loss_fn = RelativeL2Loss(space)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 2):  # two to warm up
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[2:])}


def _in_tree(tree: Path, task: list[str]) -> dict:
    """Run one measurement in a fresh process that imports fenop from ``tree``."""
    environment = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *task],
        env=environment,
        cwd=tempfile.gettempdir(),  # so that no other fenop shadows the tree's
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: {' '.join(task)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="a fenop source tree")
    parser.add_argument("--resolution", type=int, default=85, help="mesh vertices a side")
    parser.add_argument("--train", type=int, default=400, help="training samples in the store")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10, help="samples per measured step")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processors", nargs="+", default=list(PROCESSORS))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "startup":
            result = _startup(rest[0], *map(int, rest[1:]))
        else:
            result = _step(rest[0], *map(int, rest[1:]))
        print(json.dumps(result))
        return result

    from fenop.data import generate
    from fenop.fem import unit_square

    trees = args.tree or [ROOT]
    n = args.resolution
    store = Path(tempfile.mkdtemp()) / "darcy.h5"
    print(f"generating {args.train + args.test} Darcy samples at {n} x {n} ...", file=sys.stderr)
    generate("darcy", args.train + args.test, unit_square(n), seed=0, path=store, progress=False)
    tasks = {"start-up": ["startup", str(store), str(n - 1), str(args.train), str(args.test)]}
    for name in args.processors:
        tasks[f"step {name}"] = ["step", name, str(n), str(args.batch), str(args.steps)]
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for task, command in tasks.items():
            for tree in trees:  # side by side: the trees take turns
                runs.setdefault((task, str(tree)), []).append(_in_tree(tree, command))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch on CPU")
    print(f"# {n} x {n} P1 mesh, store of {args.train + args.test} samples, batch {args.batch}")
    print("| measurement | tree | median s | store opens | spaces built |")
    print("|---|---|---:|---:|---:|")
    results = {}
    for (task, tree), measured in runs.items():
        median = statistics.median(r["seconds"] for r in measured)
        opens = measured[0].get("store_opens", "")
        spaces = measured[0].get("spaces_built", "")
        results[(task, tree)] = {**measured[0], "seconds": median}
        print(f"| {task} | {tree} | {median:.3f} | {opens} | {spaces} |")
    return results


if __name__ == "__main__":
    main()
