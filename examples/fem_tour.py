"""A tour of fenop's FE layer: learn the Poisson solution operator on the L-shape.

1. A P1 space on the L-shaped domain, zero Dirichlet values on its boundary.
2. Data from scikit-fem: random smooth sources f, solutions of -Δu = f, u = 0.
3. A model that reads and writes FE coefficients: GridEncoder -> neuralop FNO ->
   FEDecoder. The grid covers the bounding box; a mask channel marks the cut-out.
4. Training with the FE relative L2 loss; the test error, and the boundary
   values, which are exactly zero by construction.

    python examples/fem_tour.py            # about a minute on a laptop CPU
"""

from __future__ import annotations

import argparse

import numpy as np
import skfem
import torch
from neuralop.models import FNO
from skfem.helpers import dot, grad

from fenop.fem import FEDecoder, FunctionSpace, GridEncoder, RelativeL2Loss, l_shape


def random_sources(space: FunctionSpace, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, n_dofs)`` smooth random fields: a few random Fourier modes each."""
    x, y = space.dof_points.T
    fields = np.zeros((n, space.n_dofs))
    for kx in range(1, 4):
        for ky in range(1, 4):
            amplitude = rng.standard_normal((n, 2)) / (kx**2 + ky**2)
            phase = np.pi * (kx * x[None] + ky * y[None]) / 2
            fields += amplitude[:, :1] * np.sin(phase) + amplitude[:, 1:] * np.cos(phase)
    return 10 * fields


def solve_poisson(space: FunctionSpace, sources: np.ndarray) -> np.ndarray:
    """Solve -Δu = f, u = 0 on the boundary, for each source ``(n, n_dofs)`` (P1 f)."""

    @skfem.BilinearForm
    def laplace(u, v, _):
        return dot(grad(u), grad(v))

    stiffness = laplace.assemble(space.basis)
    mass = skfem.BilinearForm(lambda u, v, _: u * v).assemble(space.basis)
    interior = np.setdiff1d(np.arange(space.n_dofs), space.boundary_dofs)
    return np.stack(
        [skfem.solve(*skfem.condense(stiffness, mass @ f, I=interior)) for f in sources]
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    args = parser.parse_args(argv)
    n_vertices, n_train, n_test, epochs = (17, 16, 4, 2) if args.quick else (33, 400, 100, 40)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    space = FunctionSpace(l_shape(n_vertices), dirichlet="boundary")
    print(f"space: {space}")
    sources = random_sources(space, n_train + n_test, rng)
    solutions = solve_poisson(space, sources)
    f = torch.tensor(sources, dtype=torch.float32)[:, None]
    u = torch.tensor(solutions, dtype=torch.float32)[:, None]
    scale = u.abs().max()  # one number, so the model learns u / scale

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
    batch = 20
    for epoch in range(epochs):
        order = torch.randperm(n_train)
        for start in range(0, n_train, batch):
            idx = order[start : start + batch]
            optimiser.zero_grad()
            loss = loss_fn(model(f[idx]), u[idx] / scale)
            loss.backward()
            optimiser.step()
        scheduler.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}  train relative L2 {loss.item():.4f}")

    with torch.no_grad():
        prediction = model(f[n_train:]) * scale
    test_error = loss_fn(prediction, u[n_train:]).item()
    boundary = prediction[..., space.boundary_dofs].abs().max().item()
    print(f"test relative L2 error: {test_error:.4f} over {n_test} samples")
    print(f"largest |u| on the Dirichlet boundary: {boundary} (exactly zero by construction)")
    return {"test_error": test_error, "boundary_max": boundary}


if __name__ == "__main__":
    main()
