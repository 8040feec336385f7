"""Run the shipped darcy-fno model on Darcy inputs stored in HDF5, on a mesh it never saw.

1. Inputs: `generate` writes Darcy samples (inputs and scikit-fem solutions) on an
   unstructured triangulation of the unit square into ``inputs.h5``.
2. The model: ``load_model("darcy-fno")``, moved to that mesh with ``transfer``.
3. Predictions go to ``predicted.h5`` in the same layout (what ``fenop predict``
   writes), and are compared with the solutions.

    python examples/predict_hdf5.py
    python examples/predict_hdf5.py --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.spatial
import skfem
import torch

from fenop.data import FieldDataset, generate
from fenop.data.store import create_store, write_samples
from fenop.fem import RelativeL2Loss
from fenop.train import load_model


def unstructured_square(n_interior: int, n_side: int, seed: int) -> skfem.MeshTri1:
    """A Delaunay triangulation of the unit square with random interior points."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n_side)
    edges = [np.stack([t, 0 * t], 1), np.stack([t, 0 * t + 1], 1)]
    edges += [np.stack([0 * t, t], 1)[1:-1], np.stack([0 * t + 1, t], 1)[1:-1]]
    points = np.concatenate([*edges, rng.uniform(0.02, 0.98, size=(n_interior, 2))])
    return skfem.MeshTri(points.T.copy(), scipy.spatial.Delaunay(points).simplices.T.copy())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, for the test suite")
    parser.add_argument("--output", type=Path, default=Path("runs/predict_hdf5"))
    args = parser.parse_args(argv)
    n_samples = 4 if args.quick else 50
    args.output.mkdir(parents=True, exist_ok=True)

    mesh = unstructured_square(1500, 41, seed=7)
    inputs = generate(
        "darcy", n_samples, mesh, seed=2024, path=args.output / "inputs.h5", progress=False
    )
    data = FieldDataset(inputs)
    model = load_model("darcy-fno").transfer(data.space)

    a = torch.stack([data[i][0] for i in range(len(data))])
    u = torch.stack([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        prediction = model(a)
    output = args.output / "predicted.h5"
    create_store(
        output, data.space, fields=["u"], n_samples=n_samples, attrs={"model": "darcy-fno"}
    )
    write_samples(output, 0, {"u": prediction[:, 0].double().numpy()})
    error = RelativeL2Loss(data.space)(prediction, u).item()
    print(
        f"{data.space.n_dofs} DOFs on an unstructured mesh; relative L2 error {error:.4f} "
        f"over {n_samples} samples; predictions in {output}"
    )
    return {"test_error": error, "output": output}


if __name__ == "__main__":
    main()
