"""The constraints' dense solves: against NumPy's, and systems that are not finite."""

import math

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
