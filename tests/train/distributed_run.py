"""One training run for tests/train/test_distributed.py, under torchrun or alone:

    python distributed_run.py STORE FOLDER EPOCHS [--stop-after K] [--resume]
        [--femultigrid | --fno | --experts | --stepper] [--fail-on-rank R] [--batch-size B]

``--stop-after K``: a run of EPOCHS epochs that ends after K, as a killed one would.
A small MgNO (or FEMultigrid, or FNO with its complex weights; or MgNO under an
MoEConstraint of 5 experts, trained with the experts sharded over the processes)
in float64 on the store's samples 0-16 (training) and 17-22 (test), batch 6 (so
the last batch of each epoch has 5 samples, which 2 and 3 processes share unevenly).
``--fail-on-rank R``: process R fails reading its second batch. ``--stepper``: a
store of heat trajectories, a stepper under the constraint per step trained by the
pushforward trick with noise on its inputs (trajectories 0-3 train, 4-5 test)."""

import os
import sys

import torch

from fenop.data import FieldDataset, StepDataset, read_store
from fenop.fem import FunctionSpace, unit_square
from fenop.operators import FNO, FEMultigrid, FEOperator, MgNO
from fenop.train import Trainer
from fenop.train.physics import build_constraint, constraint_table


def main() -> None:
    store, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stepping = {}
    if "--stepper" in sys.argv:
        train = StepDataset(store, indices=range(4), dtype=torch.float64)
        test = StepDataset(store, indices=range(4, 6), dtype=torch.float64)
        stepping = {"mode": "pushforward", "unroll": 2, "noise": 0.05}
    else:
        train = FieldDataset(store, indices=range(17), dtype=torch.float64)
        test = FieldDataset(store, indices=range(17, 23), dtype=torch.float64)
    torch.manual_seed(0)
    if "--stepper" in sys.argv:
        parameters = read_store(store).header["parameters"]
        table = {"pde": "heat", "parameters": parameters, "inputs": ["u_prev"]}
        step = build_constraint(
            constraint_table({**table, "kind": "global", "n_basis": 3}), train.space
        )
        processor = MgNO(4, 4, grid=(8, 8), width=4, n_layers=1)
        stats = train.normalizers()
        model = FEOperator(
            train.space,
            train.space,
            processor,
            resolution=8,
            constraint=step,
            constraint_inputs=["u_prev"],
            input_stats=stats[0],
            output_stats=stats[1],
        ).double()
    elif "--femultigrid" in sys.argv:  # on the mesh hierarchy 3 x 3, 5 x 5, 9 x 9
        spaces = [FunctionSpace(unit_square(n), dirichlet="boundary") for n in (3, 5, 9)]
        processor = FEMultigrid(spaces, 1, 1, width=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor).double()
    elif "--fno" in sys.argv:
        processor = FNO(4, 1, n_modes=(4, 4), hidden_channels=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor, resolution=8).double()
    elif "--experts" in sys.argv:
        table = {"pde": "darcy", "inputs": ["a"], "n_basis": 3, "experts": 5, "sweeps": 1}
        moe = build_constraint(constraint_table(table), train.space)
        processor = MgNO(4, 4, grid=(8, 8), width=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor, resolution=8, constraint=moe)
        model = model.double()
    else:
        processor = MgNO(4, 1, grid=(8, 8), width=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor, resolution=8).double()
    trainer = Trainer(
        model,
        train,
        test,
        epochs=epochs,
        batch_size=int(_option("--batch-size")) if "--batch-size" in sys.argv else 6,
        directory=folder,
        resume="--resume" in sys.argv,
        device="cpu",
        progress=False,
        parallel="experts" if "--experts" in sys.argv else "data",
        **stepping,
    )
    if "--experts" in sys.argv:  # sharded, not merely run on several processes
        assert model.constraint.world == int(os.environ.get("WORLD_SIZE", "1"))
    if "--fail-on-rank" in sys.argv and trainer.rank == int(_option("--fail-on-rank")):
        reads = iter(range(2))

        def failing(items):
            if next(reads, None) is None:
                raise RuntimeError(f"rank {trainer.rank} cannot read samples {items}")
            return train.__class__.__getitems__(train, items)

        train.__getitems__ = failing
    if "--stop-after" in sys.argv:
        trainer.epochs = int(_option("--stop-after"))
    trainer.fit()


def _option(name: str) -> str:
    return sys.argv[sys.argv.index(name) + 1]


if __name__ == "__main__":
    main()
