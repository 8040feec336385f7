"""Inference speed: the shipped darcy-fno against scikit-fem solves of the same samples.

For each resolution R, Darcy inputs on `unit_square(R)` are written to a store; then,
in one run:
  - classical: fenop's scikit-fem path (assembly of K(a) + sparse direct solve) per sample;
  - model: `load_model("darcy-fno").transfer(space)` on batches of 32 (model time only);
  - end to end: `predict_store` (what `fenop predict darcy-fno IN.h5 -o OUT.h5` runs),
    in-process, HDF5 in and out;
and, once, the time to first prediction in a fresh process (import, load, one sample).

    python benchmarks/inference.py
    python benchmarks/inference.py --resolutions 129 --samples 16    # quicker
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FIRST_PREDICTION = """
import time; start = time.perf_counter()
import torch
from fenop.fem import FunctionSpace, unit_square
from fenop.train import load_model
space = FunctionSpace(unit_square({n}), dirichlet="boundary")
model = load_model("darcy-fno").transfer(space)
with torch.no_grad():
    model(torch.full((1, 1, space.n_dofs), 12.0))
print(time.perf_counter() - start)
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[129, 257])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from fenop.data import FieldDataset, generate
    from fenop.data.pdes import Darcy
    from fenop.fem import FunctionSpace, unit_square
    from fenop.train import load_model, predict_store

    device = torch.device(args.device)
    print(
        f"inference: darcy-fno vs scikit-fem, {args.samples} samples per resolution, "
        f"device {device} ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    columns = (
        "R",
        "DOFs",
        "solve /s",
        "model /s",
        "model / solve",
        "predict /s",
        "predict / solve",
    )
    print(" ".join(f"{c:>{max(9, len(c))}}" for c in columns))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for n in args.resolutions:
            mesh = unit_square(n)
            path = generate(
                "darcy", args.samples, mesh, seed=7, path=Path(folder) / f"in{n}.h5", progress=False
            )
            data = FieldDataset(path)
            a = torch.stack([data[i][0] for i in range(len(data))])
            space = FunctionSpace(mesh, dirichlet="boundary")
            darcy = Darcy(space)
            start = time.perf_counter()
            for sample in a[:, 0].double().numpy():
                darcy.solve(a=sample)
            solve = args.samples / (time.perf_counter() - start)

            model = load_model("darcy-fno", device=device).transfer(space)
            with torch.no_grad():
                model(a[:2].to(device))  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in a.split(32):
                    model(batch.to(device)).cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                model_rate = args.samples / (time.perf_counter() - start)

            out = Path(folder) / f"out{n}.h5"
            start = time.perf_counter()
            predict_store("darcy-fno", path, out, device=args.device, progress=False)
            predict = args.samples / (time.perf_counter() - start)
            results[n] = {"solve": solve, "model": model_rate, "predict": predict}
            print(
                f"{n:>9} {space.n_dofs:>9} {solve:>9.1f} {model_rate:>9.1f} "
                f"{model_rate / solve:>13.2f} {predict:>10.1f} {predict / solve:>15.2f}",
                flush=True,
            )
        n = args.resolutions[0]
        first = subprocess.run(
            [sys.executable, "-c", FIRST_PREDICTION.format(n=n)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = float(first.stdout.strip().splitlines()[-1])
        results["first_prediction_s"] = seconds
        what = f"fresh process: import, load, one sample at {n} x {n}"
        print(f"time to first prediction ({what}): {seconds:.2f} s")
    return results


if __name__ == "__main__":
    main()
