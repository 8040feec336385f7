"""One model three ways on nonlinear diffusion: unconstrained, soft (physics loss), hard.

-div((1 + u²) ∇u) = f on the unit square, u = 0 on the boundary. The same MgNO
inside an FEOperator is trained with the same data, seed and epochs

- unconstrained: the FE relative L2 loss alone;
- soft: that loss plus the scaled FE residual norm (``physics_weight``);
- hard: the processor also emits basis fields, and a HardConstraint (a global
  Galerkin solve by Newton's method, gradients by the implicit function theorem)
  makes the output satisfy the discrete PDE in their span; without ``--quick`` also
  an MoEConstraint (METIS experts after the global solve),

and each is scored on the same test samples, with the residual norm of its output.

    python examples/hard_constraints.py           # the full run: 310 s on 2 CPU cores
    python examples/hard_constraints.py --quick   # about 10 s (what the tests run)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fenop.data import FieldDataset, generate
from fenop.fem import FunctionSpace, MetisPartition, unit_square
from fenop.operators import FEOperator, HardConstraint, MgNO, MoEConstraint
from fenop.train import Trainer
from fenop.train.physics import PhysicsLoss


def _model(space, n: int, n_basis: int, stats, constraint=None) -> FEOperator:
    torch.manual_seed(0)  # the same initial weights for every variant
    hard = constraint is not None
    processor = MgNO(4, 1 + (n_basis if hard else 0), grid=(n, n), width=16, n_layers=2)
    extra = {"constraint": constraint, "constraint_inputs": ("f",)} if hard else {}
    return FEOperator(space, space, processor, resolution=n, **stats, **extra)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    parser.add_argument("--output", type=Path, default=Path("runs/hard_constraints"))
    args = parser.parse_args(argv)
    n, n_train, n_test, epochs, n_basis = (17, 32, 8, 8, 8) if args.quick else (33, 200, 50, 15, 16)
    args.output.mkdir(parents=True, exist_ok=True)
    path = generate(
        "nonlinear_diffusion",
        n_train + n_test,
        unit_square(n),
        seed=0,
        path=args.output / "data.h5",
        progress=False,
    )
    train = FieldDataset(path, inputs=["f"], indices=range(n_train))
    test = FieldDataset(path, inputs=["f"], indices=range(n_train, n_train + n_test))
    space: FunctionSpace = train.space
    from fenop.data.pdes import get_pde

    residual = get_pde("nonlinear_diffusion")(space).residual()
    f_stats, u_stats = train.normalizers()
    stats = {"input_stats": f_stats, "output_stats": u_stats}
    runs = {
        "unconstrained": (_model(space, n, n_basis, stats), 0.0),
        "soft (physics_weight 0.1)": (_model(space, n, n_basis, stats), 0.1),
        "hard (global Galerkin)": (
            _model(space, n, n_basis, stats, HardConstraint(residual)),
            0.0,
        ),
    }
    if not args.quick:  # the experts' Newton solves: 3 of the full run's 5 minutes
        experts = MoEConstraint(residual, MetisPartition(experts=4), sweeps=2)
        runs["hard (MoE, K = 4)"] = (_model(space, n, n_basis, stats, experts), 0.0)
    physics = PhysicsLoss(residual, ["f"])
    results = {}
    for name, (model, weight) in runs.items():
        trainer = Trainer(
            model,
            train,
            test,
            epochs=epochs,
            batch_size=8,
            lr=1e-3,
            device="cpu",
            seed=0,
            progress=False,
            physics=physics if weight > 0 else None,
            physics_weight=weight,
        )
        start = time.perf_counter()
        history = trainer.fit()
        seconds = time.perf_counter() - start
        x, _ = zip(*(test[i] for i in range(len(test))), strict=True)
        with torch.no_grad():
            residual_norm = physics(model.eval()(torch.stack(x)), torch.stack(x)).item()
        results[name] = {
            "test_error": history[-1]["test_l2"],
            "residual": residual_norm,
            "seconds": seconds,
        }
        print(
            f"{name:<28} test relative L2 {history[-1]['test_l2']:.4f}, "
            f"relative residual {residual_norm:.2e}, training {seconds:.0f} s"
        )
    return results


if __name__ == "__main__":
    main()
