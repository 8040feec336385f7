"""The constraints' dense solves: against NumPy's, and systems that are not finite."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fenop.operators.constraints.factorisation import Factorisation


@pytest.mark.parametrize("symmetric", [True, False])
def test_systems_that_are_not_finite_are_reported_and_the_others_solved(symmetric):
    # LAPACK is never handed NaN or Inf (MKL's LU did not return from one): such a
    # system is reported as failed, and the finite ones in the batch are solved
    good = [[4.0, 1.0], [1.0, 3.0]]
    matrix = torch.tensor(
        [good, [[math.nan, 1.0], [1.0, 3.0]], [[4.0, math.inf], [math.inf, 3.0]]],
        dtype=torch.float64,
    )
    rhs = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    factors = Factorisation(matrix, ridge=0.0, symmetric=symmetric)
    w, ok = factors.solve(rhs)
    assert factors.ok.tolist() == [True, False, False] and ok.tolist() == [True, False, False]
    np.testing.assert_allclose(w[0].numpy(), np.linalg.solve(good, [1.0, 2.0]), rtol=1e-12)
    assert torch.isinf(factors.condition()[1:]).all()


_AFTER_SET_NUM_THREADS = """
import numpy as np, torch
from fenop.operators._linalg import lu_factor_ex, solve_ex
from fenop.operators.constraints.factorisation import Factorisation
torch.set_num_threads(2)
rng = np.random.default_rng(0)
n = 289
matrix = torch.from_numpy(rng.standard_normal((3, n, n)) + n * np.eye(n))
rhs = torch.from_numpy(rng.standard_normal((3, n)))
w, ok = Factorisation(matrix, ridge=0.0, symmetric=False).solve(rhs)
expected = np.linalg.solve(matrix.numpy(), rhs.numpy()[..., None])[..., 0]
assert ok.all() and np.allclose(w.numpy(), expected, rtol=1e-10, atol=1e-12)
factor, pivots, info = lu_factor_ex(matrix)
assert (info == 0).all() and pivots.shape == (3, n)
y, info = solve_ex(matrix.mT, rhs[..., None])
transposed = np.linalg.solve(matrix.numpy().transpose(0, 2, 1), rhs.numpy()[..., None])
assert np.allclose(y.numpy(), transposed, rtol=1e-10, atol=1e-12)
print("solved")
"""


def test_batched_lu_of_large_systems_returns_after_set_num_threads():
    # PyTorch's batched CPU LU hung in MKL ("DLASWP" messages) on a batch of
    # 289 x 289 systems, the coarse grid's, once torch.set_num_threads had been
    # called, as `fenop train --threads` does; in a process of its own, with a limit
    done = subprocess.run(
        [sys.executable, "-c", _AFTER_SET_NUM_THREADS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "solved" and "DLASWP" not in done.stderr
