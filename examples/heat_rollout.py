"""Learn a time stepper of the heat equation and roll it out, with and without the
hard constraint per step: generate trajectories, train, roll out, plot.

    python examples/heat_rollout.py               # a few minutes on a 2-core CPU
    python examples/heat_rollout.py --quick       # seconds (what the tests run)

Each model maps the state u_n to u_{n+1}; a rollout feeds it its own output. The
constrained model emits a correction basis beside its prediction and makes each
predicted state satisfy the implicit Euler step of the data in that basis (the
Galerkin condition, from its own previous state). Writes into
``runs/heat_rollout/``: the data, both runs, ``errors_*.png`` (error against time)
and ``rollout.xdmf`` (the constrained rollout beside the solver's, for ParaView;
``predicted.h5``, the rollouts as a store).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fenop.data import StepDataset, generate
from fenop.data.meshio_files import store_to_meshio
from fenop.data.pdes import Heat
from fenop.fem import unit_square
from fenop.operators import FNO, FEOperator
from fenop.train import Trainer, load_model, rollout
from fenop.train.physics import build_constraint, constraint_table
from fenop.train.plots import plot_rollout_errors
from fenop.train.trajectories import evaluate_rollouts, predict_rollouts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    parser.add_argument("--output", type=Path, default=Path("runs/heat_rollout"))
    args = parser.parse_args(argv)
    n, n_train, n_test, steps, epochs = (9, 6, 2, 6, 2) if args.quick else (33, 48, 8, 40, 8)
    args.output.mkdir(parents=True, exist_ok=True)
    dt = 0.0025
    path = generate(
        "heat",
        n_train + n_test,
        unit_square(n),
        seed=0,
        path=args.output / "heat.h5",
        n_steps=steps,
        t_final=steps * dt,
        trajectory=True,
    )
    train = StepDataset(path, indices=range(n_train))
    test = StepDataset(path, indices=range(n_train, n_train + n_test))
    stats = train.normalizers()
    space = train.space
    family = Heat(space, t_final=steps * dt, n_steps=steps)

    results = {}
    for name, n_basis in (("unconstrained", 0), ("constrained", 16)):
        torch.manual_seed(0)
        processor = FNO(4, 1 + n_basis, n_modes=(min(12, n // 2),) * 2, hidden_channels=32)
        # the heat residual of one implicit Euler step of the data's, R(u; u_prev), by
        # description (as a [model.constraint] table makes it), so checkpoints hold it
        constraint = None
        if n_basis:
            table = constraint_table({"kind": "global", "n_basis": n_basis})
            description = {**table, "pde": "heat", "parameters": family.parameters()}
            constraint = build_constraint({**description, "inputs": ["u_prev"]}, space)
        model = FEOperator(
            space,
            space,
            processor,
            resolution=n,
            input_stats=stats[0],
            output_stats=stats[1],
            constraint=constraint,
            constraint_inputs=("u_prev",),  # the residual's name for the input state
        )
        trainer = Trainer(
            model,
            train,
            test,
            epochs=epochs,
            batch_size=32,
            lr=2e-3,
            directory=args.output / name,
            device="cpu",
            # what `fenop evaluate` and `fenop predict` need to roll the checkpoint out
            extra={"data": {"file": path.name, "stepper": train.description()}},
        )
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        checkpoint = args.output / name / "best"
        evaluation = evaluate_rollouts(checkpoint, path, samples=slice(n_train, None))
        print(f"{name} ({seconds:.0f} s of training):")
        for line in evaluation.summary():
            print(f"  {line}")
        plot_rollout_errors(evaluation, args.output / f"errors_{name}.png")
        results[name] = float(evaluation.free_l2[:, -1].mean())

    # The rollouts against the solver for the same steps.
    states = test.trajectories(range(n_test))
    model = load_model(args.output / "constrained" / "best").eval()
    start = time.perf_counter()
    rollout(model, states[:, :1], steps)
    network = time.perf_counter() - start
    start = time.perf_counter()
    for u0 in states[:, 0].double().numpy():
        family.states(u0)
    solver = time.perf_counter() - start
    print(
        f"{n_test} rollouts of {steps} steps: the network {network:.3f} s, "
        f"scikit-fem {solver:.3f} s"
    )
    # The first test trajectory and its rollout, as ParaView plays them.
    predicted = predict_rollouts(
        args.output / "constrained" / "best",
        path,
        args.output / "predicted.h5",
        steps=steps,
        overwrite=True,
        progress=False,
    )
    written = store_to_meshio(
        path,
        args.output / "rollout.xdmf",
        predictions=predicted,
        samples=slice(n_train, n_train + 1),
        overwrite=True,
    )
    print(f"wrote {written[0]}")
    return results | {"xdmf": written[0]}


if __name__ == "__main__":
    main()
