"""A tour of fenop: learn the Poisson solution operator on the L-shape.

1. Data: `fenop.data.generate` solves -Δu = f, u = 0 on the boundary, for random
   sources f (Gaussian random fields) with scikit-fem, into an HDF5 store.
2. A P1 space on the L-shaped domain, read back from the store, and a model that
   reads and writes FE coefficients: GridEncoder -> neuralop FNO -> FEDecoder.
   The grid covers the bounding box; a mask channel marks the cut-out quadrant.
3. Training with the FE relative L2 loss on normalised fields; the test error,
   and the boundary values, which are exactly zero by construction.

    python examples/fem_tour.py                 # about a minute and a half on 2 CPU cores
    python examples/fem_tour.py --data p.h5     # reuse (or resume) a generated store
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from neuralop.models import FNO
from torch.utils.data import DataLoader

from fenop.data import FieldDataset, generate
from fenop.fem import FEDecoder, GridEncoder, RelativeL2Loss, l_shape


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    parser.add_argument("--data", type=Path, help="store to use or create (default: temporary)")
    args = parser.parse_args(argv)
    n_vertices, n_train, n_test, epochs = (17, 16, 4, 2) if args.quick else (33, 400, 100, 40)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        path = args.data or Path(folder) / "poisson.h5"
        generate("poisson", n_train + n_test, l_shape(n_vertices), seed=0, path=path, workers=1)
        fields = {"inputs": ["f"], "outputs": ["u"]}
        train = FieldDataset(path, **fields, indices=range(n_train))
        test = FieldDataset(path, **fields, indices=range(n_train, n_train + n_test))
        return _fit(train, test, n_vertices=n_vertices, epochs=epochs)


def _fit(train: FieldDataset, test: FieldDataset, *, n_vertices: int, epochs: int) -> dict:
    space = train.space
    print(f"space: {space}")
    f_norm, u_norm = train.normalizers()
    # Scale u without shifting it, so that zero boundary values stay zero.
    u_scale = float(torch.sqrt(u_norm.mean**2 + u_norm.std**2))

    encoder = GridEncoder(space, n_vertices)
    model = torch.nn.Sequential(
        encoder,
        FNO(
            n_modes=(8, 8),
            in_channels=encoder.out_channels(1),
            out_channels=1,
            hidden_channels=24,
            positional_embedding=None,
        ),
        FEDecoder(space, n_vertices),
    )
    loss_fn = RelativeL2Loss(space)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    loader = DataLoader(train, batch_size=20, shuffle=True)
    for epoch in range(epochs):
        for f, u in loader:
            optimiser.zero_grad()
            loss = loss_fn(model(f_norm.encode(f)), u / u_scale)
            loss.backward()
            optimiser.step()
        scheduler.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  train relative L2 {loss.item():.4f}")

    f, u = next(iter(DataLoader(test, batch_size=len(test))))
    with torch.no_grad():
        prediction = model(f_norm.encode(f)) * u_scale
    test_error = loss_fn(prediction, u).item()
    boundary = prediction[..., space.boundary_dofs].abs().max().item()
    print(f"test relative L2 error: {test_error:.4f} over {len(test)} samples")
    print(f"largest |u| on the Dirichlet boundary: {boundary} (exactly zero by construction)")
    return {"test_error": test_error, "boundary_max": boundary}


if __name__ == "__main__":
    main()
