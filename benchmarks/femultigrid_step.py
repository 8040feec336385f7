"""One FEMultigrid training step: its time, and how many kernels it launches.

On a GPU at the sizes of the Darcy benchmark a step is bound by kernel launches
rather than arithmetic (see BENCHMARKS.md, "On a GPU"), so the number of kernels
per step matters as much as the work. On CUDA the profiler counts the GPU's
operations (kernels, copies, fills); on the CPU it counts the operators that do
work (tensor views and allocations left out), the launches they would be on a GPU.

The step is that of `benchmarks/darcy.py`: `FEOperator` with `FEMultigrid` (its
hierarchy down from `unit_square(R)`, width 32, 4 layers), the FE relative L2
loss, AdamW.

    python benchmarks/femultigrid_step.py                       # 33 x 33 on the CPU
    python benchmarks/femultigrid_step.py --device cuda --resolution 85
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fenop.fem import FunctionSpace, RelativeL2Loss, unit_square
from fenop.operators import FEMultigrid, FEOperator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from darcy import _clock, square_hierarchy, square_levels  # the Darcy benchmark's pieces

# Operators that only describe, view or allocate memory: no kernel on a GPU.
_NO_WORK = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::alias",
    "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::slice",
    "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg",
    "aten::_nnz", "aten::crow_indices", "aten::col_indices", "aten::values",
    "aten::lift_fresh", "aten::_reshape_alias", "aten::result_type", "aten::is_nonzero",
}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=33, help="vertices a side")
    parser.add_argument(
        "--coarsest", type=int, default=11, help="most vertices a side of the coarsest level"
    )
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    n, device = args.resolution, torch.device(args.device)
    torch.manual_seed(0)
    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    levels = square_levels(n, coarsest=args.coarsest)
    spaces = square_hierarchy(levels)
    processor = FEMultigrid(spaces, 1, 1, width=args.width, n_layers=4)
    model = FEOperator(space, space, processor).to(device)
    loss_fn = RelativeL2Loss(space).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 1, space.n_dofs, device=device)
    y = torch.randn(args.batch, 1, space.n_dofs, device=device)

    def step():
        optimiser.zero_grad()
        loss_fn(model(x), y).backward()
        optimiser.step()

    for _ in range(3):  # warm-up: allocator, kernel selection
        step()
    rounds = []
    for _ in range(args.rounds):
        start = _clock(device)
        for _ in range(args.steps):
            step()
        rounds.append((_clock(device) - start) / args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _clock(device)
    events = prof.events()
    if device.type == "cuda":
        kind, count = (
            "GPU operations (kernels, copies, fills)",
            sum(e.device_type.name == "CUDA" for e in events),
        )
    else:
        kind = "operators doing work"
        count = sum(
            e.name.startswith("aten::") and not e.cpu_children and e.name not in _NO_WORK
            for e in events
        )
    result = {"step_ms": 1e3 * float(np.median(rounds)), "launches": count, "kind": kind}
    print(
        f"FEMultigrid step at {n} x {n} (levels {', '.join(map(str, levels))}), batch "
        f"{args.batch}, width {args.width}, device {device} ({torch.get_num_threads()} "
        f"threads): {result['step_ms']:.1f} ms median of {args.rounds} rounds x "
        f"{args.steps}; {count} {kind} per step"
    )
    return result


if __name__ == "__main__":
    main()
