"""Forward + backward of an FE sparse product: autograd's own backward against the stored transpose.

fenop's `SparseMatrix` keeps each FE matrix's transpose (CSR) and multiplies by it
in the backward pass; autograd's own backward of `csr @ x` forms `csr.t()`, a CSC
tensor, and converts it to CSR on every call. Both run interleaved in one process
on the same matrices and inputs; the figure is the median over rounds of the time
ratio. Matrices: the FE decoder of `fem_overhead.py` (64 x 64 grid to a 64 x 64 P1
mesh, 16 columns: batch x channels) and FEMultigrid's stacked stencils at 33, 65
and 129 vertices a side (640 columns: batch 20 x width 32).

    python benchmarks/sparse_product.py
    python benchmarks/sparse_product.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from fenop.fem import FEDecoder, FunctionSpace, unit_square
from fenop.fem.sparse import SparseMatrix
from fenop.operators.fe_multigrid import _stencils


def _cases():
    space = FunctionSpace(unit_square(64))
    yield "decoder 64x64 grid -> P1 64", FEDecoder(space, 64).matrix, 16
    for n in (33, 65, 129):
        yield f"FEMultigrid stencils, P1 {n}", _stencils(FunctionSpace(unit_square(n)))[0], 640


def _timer(matrix: SparseMatrix, x: torch.Tensor, *, stored: bool, device):
    csr = matrix.csr(x.dtype)

    def run(steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            y = matrix.rows(x) if stored else csr @ x
            y.backward(torch.ones_like(y))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="products per variant per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"sparse product, float32, forward + backward, device {device} ({name})")
    print(f"{'matrix':<30} {'rows':>8} {'autograd ms':>12} {'stored ms':>10} {'ratio':>7}")
    results = {}
    for label, matrix, columns in _cases():
        matrix = matrix.to(device)
        x = torch.randn(matrix.shape[1], columns, device=device, requires_grad=True)
        own, stored = (_timer(matrix, x, stored=s, device=device) for s in (False, True))
        own(2), stored(2)  # warm-up: kernels, caches
        rounds = [(own(args.steps), stored(args.steps)) for _ in range(args.rounds)]
        ratio = statistics.median(s / a for a, s in rounds)
        own_ms = 1e3 * statistics.median(a for a, _ in rounds)
        stored_ms = 1e3 * statistics.median(s for _, s in rounds)
        results[label] = {"autograd_ms": own_ms, "stored_ms": stored_ms, "ratio": ratio}
        print(
            f"{label:<30} {matrix.shape[0]:>8} {own_ms:>12.3f} {stored_ms:>10.3f} {ratio:>7.2f}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
