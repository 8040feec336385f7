"""One MoEConstraint call for tests/operators/test_sharding.py, under torchrun or alone:

    python sharding_run.py OUT [--nonlinear] [--newton] [--least-squares] [--owners]

Darcy (or nonlinear diffusion, its experts on the linearisation or, ``--newton``,
each solving by Newton's method) on a 9 x 9 P1 mesh, two samples, 7 experts (colours
whose experts two processes do not share evenly), 2 sweeps after the coarse solve;
the output and the gradients of a weighted sum of it with respect to the
prediction, the basis and the PDE's input, written by rank 0 to OUT (safetensors)."""

import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, unit_square
from fenop.operators import MoEConstraint


def main() -> None:
    out, options = sys.argv[1], sys.argv[2:]
    rank, world = 0, 1
    if "WORLD_SIZE" in __import__("os").environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    family = get_pde("nonlinear_diffusion" if "--nonlinear" in options else "darcy")(space)
    name = family.inputs[0]
    samples = [family.sample(0, i) for i in range(2)]
    data = torch.from_numpy(np.stack([s[name] for s in samples])).requires_grad_(True)
    solution = torch.from_numpy(np.stack([s["u"] for s in samples]))
    moe = MoEConstraint(
        family.residual(),
        MetisPartition(experts=7),
        condition="least_squares" if "--least-squares" in options else "galerkin",
        update="restricted_additive" if "--owners" in options else "multiplicative",
        nonlinear="newton" if "--newton" in options else "linearised",
        sweeps=2,
    )
    moe.shard(rank, world)
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.from_numpy(c) for c in space.dof_points.T)
    bubble = x * (1 - x) * y * (1 - y)
    waves = torch.stack([torch.sin((k + 1) * torch.pi * x) * torch.cos(k * y) for k in range(4)])
    basis = bubble * waves + 0.01 * torch.randn(2, 4, space.n_dofs, generator=generator)
    basis = basis.double().requires_grad_(True)
    prediction = (0.8 * solution[:, None]).requires_grad_(True)
    output = moe(prediction, basis, **{name: data})
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    (output * weights).sum().backward()
    assert bool(moe.report["converged"].all()), moe.report
    if rank == 0:
        save_file(
            {
                "output": output.detach(),
                "prediction": prediction.grad,
                "basis": basis.grad,
                "input": data.grad,
                "iterations": moe.report["iterations"],
                "condition": moe.report["condition"],
            },
            out,
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
