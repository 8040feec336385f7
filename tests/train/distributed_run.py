"""One training run for tests/train/test_distributed.py, under torchrun or alone:

    python distributed_run.py STORE FOLDER EPOCHS [--stop-after K] [--resume] [--femultigrid]

``--stop-after K``: a run of EPOCHS epochs that ends after K, as a killed one would.
A small MgNO (or FEMultigrid) in float64 on the store's samples 0-17 (training) and
18-22 (test), batch 5 (so the last batch of each epoch has 3 samples, fewer than
some rank counts need)."""

import sys

import torch

from fenop.data import FieldDataset
from fenop.fem import FunctionSpace, unit_square
from fenop.operators import FEMultigrid, FEOperator, MgNO
from fenop.train import Trainer


def main() -> None:
    store, folder, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    train = FieldDataset(store, indices=range(18), dtype=torch.float64)
    test = FieldDataset(store, indices=range(18, 23), dtype=torch.float64)
    torch.manual_seed(0)
    if "--femultigrid" in sys.argv:  # on the mesh hierarchy 3 x 3, 5 x 5, 9 x 9
        spaces = [FunctionSpace(unit_square(n), dirichlet="boundary") for n in (3, 5, 9)]
        processor = FEMultigrid(spaces, 1, 1, width=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor).double()
    else:
        processor = MgNO(4, 1, grid=(8, 8), width=4, n_layers=1)
        model = FEOperator(train.space, train.space, processor, resolution=8).double()
    trainer = Trainer(
        model,
        train,
        test,
        epochs=epochs,
        batch_size=5,
        directory=folder,
        resume="--resume" in sys.argv,
        device="cpu",
        progress=False,
    )
    if "--stop-after" in sys.argv:
        trainer.epochs = int(sys.argv[sys.argv.index("--stop-after") + 1])
    trainer.fit()


if __name__ == "__main__":
    main()
