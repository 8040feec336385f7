"""The hard-constraint layer in training: what it costs as the mesh grows.

``scaling``: one training step (forward, backward, optimiser) of the same
FEOperator (FNO on a 64 x 64 grid) on R x R P1 meshes, unconstrained, with the
global Galerkin constraint, and with experts (MoE, two-level Galerkin, METIS,
overlap 2, 3 sweeps; K fixed, and K growing with the mesh at a fixed number of
DOFs per expert). Each configuration runs in a process of its own, which reports
the median step time over ``--steps`` steps after one warm-up step, and the peak
resident memory those steps added (the process's peak minus its size before the
first step). Beside them, scikit-fem's solve of one sample (the data generator's).

    python benchmarks/hard_constraints.py scaling --pde darcy
    python benchmarks/hard_constraints.py scaling --pde nonlinear_diffusion --resolutions 33 65
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, unit_square
from fenop.operators import FNO, FEOperator, HardConstraint, MoEConstraint

_INPUT = {"darcy": "a", "nonlinear_diffusion": "f"}
_VARIANTS = ("unconstrained", "global", "moe K=16", "moe K=64", "moe 400 DOFs/expert")


def _constraint(variant: str, residual):
    if variant == "unconstrained":
        return None
    if variant == "global":
        return HardConstraint(residual)
    if variant.endswith("DOFs/expert"):
        return MoEConstraint(residual, MetisPartition(dofs_per_expert=int(variant.split()[1])))
    return MoEConstraint(residual, MetisPartition(experts=int(variant.split("=")[1])))


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
    processor = FNO(4, out, n_modes=(12, 12), hidden_channels=32)
    extra = {"constraint": constraint, "constraint_inputs": (name,)} if constraint else {}
    # Statistics of the batch, so the network's outputs have the solution's size, as a
    # trained model's do.
    stats = {
        "input_stats": ([x.mean().item()], [x.std().item()]),
        "output_stats": ([y.mean().item()], [y.std().item()]),
    }
    model = FEOperator(space, space, processor, resolution=64, **stats, **extra)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        begin = time.perf_counter()
        optimiser.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimiser.step()
        return time.perf_counter() - begin

    before = _rss_bytes()
    step()  # warm-up: first-use allocations and kernels
    times = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = getattr(constraint, "report", {}) if constraint is not None else {}
    experts = getattr(getattr(constraint, "partition", None), "n_experts", 1)
    return {
        "dofs": space.n_dofs,
        "step": statistics.median(times),
        "memory": max(peak - before, 0),
        "solve": solve_seconds,
        "experts": experts if constraint is not None else 0,
        "converged": bool(report["converged"].all()) if report else True,
    }


def _scaling(args) -> None:
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.pde}, batch {args.batch}, N = {args.basis}, FNO 64 x 64"
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scaling = commands.add_parser("scaling", help="step time and memory as the mesh grows")
    scaling.add_argument("--resolutions", type=int, nargs="+", default=[33, 65, 129, 225, 317])
    scaling.add_argument("--variants", nargs="+", default=list(_VARIANTS), choices=_VARIANTS)
    step = commands.add_parser("_step")  # one configuration; run by `scaling`
    step.add_argument("--resolution", type=int, required=True)
    step.add_argument("--variant", required=True, choices=_VARIANTS)
    for sub in (scaling, step):
        sub.add_argument("--pde", default="darcy", choices=sorted(_INPUT))
        sub.add_argument("--batch", type=int, default=4)
        sub.add_argument("--basis", type=int, default=16, help="N, the basis fields")
        sub.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "_step":
        print(json.dumps(_step(args)))
    else:
        _scaling(args)


if __name__ == "__main__":
    main()
