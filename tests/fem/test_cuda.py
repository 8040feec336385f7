"""The FE layer on CUDA computes what it computes on the CPU (skipped without a GPU).

Encoder and decoder have their own device tests; here the rest: point evaluation,
the FE norms and losses, and the batched forms of the residuals.
"""

import numpy as np
import pytest
import torch

from fenop.fem import (
    FEForms,
    FunctionSpace,
    RelativeH1Loss,
    RelativeL2Loss,
    h1_norm,
    l2_norm,
    l_shape,
)
from tests.helpers import l_shape_interior_points

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fe_layer_on_cuda_matches_the_cpu(dtype):
    torch.manual_seed(0)
    space = FunctionSpace(l_shape(9), degree=2, dirichlet="boundary")
    points = l_shape_interior_points(np.random.default_rng(0), 50)
    u = torch.randn(3, 1, space.n_dofs, dtype=dtype)
    v = torch.randn(3, 1, space.n_dofs, dtype=dtype)
    forms = FEForms(space)

    def everything(u, v, forms, l2, h1):
        flux = forms.values(v).unsqueeze(-3) * forms.gradients(u)
        return [
            space.evaluate(u, points),
            l2_norm(u, space),
            h1_norm(u, space),
            l2(u, v),
            h1(u, v),
            forms.assemble_gradient(flux),
        ]

    on_cpu = everything(u, v, forms, RelativeL2Loss(space), RelativeH1Loss(space))
    on_gpu = everything(
        u.cuda(),
        v.cuda(),
        forms.cuda(),
        RelativeL2Loss(space).cuda(),
        RelativeH1Loss(space).cuda(),
    )
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for expected, actual in zip(on_cpu, on_gpu, strict=True):
        assert actual.device.type == "cuda" and actual.dtype == dtype
        torch.testing.assert_close(actual.cpu(), expected, rtol=tolerance, atol=tolerance)
