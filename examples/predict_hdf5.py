"""Run the shipped darcy-fno model on Darcy inputs stored in HDF5, on a mesh it never saw.

1. Inputs: `generate` writes Darcy samples (inputs and scikit-fem solutions) on an
   unstructured triangulation of the unit square into ``inputs.h5``.
2. ``predict_store`` runs the shipped model on them (moved to that mesh) into
   ``predicted.h5``, in the same layout: what ``fenop predict`` does.
3. ``evaluate_store`` compares its predictions with the solutions, as
   ``fenop evaluate`` does.

    python examples/predict_hdf5.py
    python examples/predict_hdf5.py --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.spatial
import skfem

from fenop.data import generate, read_store
from fenop.train import evaluate_store, predict_store


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
    # What `fenop predict darcy-fno inputs.h5 -o predicted.h5` runs: the model moves
    # to the store's mesh, and the predictions go to a store on that mesh.
    output = args.output / "predicted.h5"
    predict_store("darcy-fno", inputs, output, overwrite=True, progress=not args.quick)
    # And `fenop evaluate`: relative L2 in the FE norm of that mesh, per sample.
    evaluation = evaluate_store("darcy-fno", inputs)
    error = float(evaluation.l2.mean())
    n_dofs = read_store(output).space.n_dofs
    print(
        f"{n_dofs} DOFs on an unstructured mesh; relative L2 error {error:.4f} "
        f"over {n_samples} samples; predictions in {output}"
    )
    return {"test_error": error, "output": output}


if __name__ == "__main__":
    main()
