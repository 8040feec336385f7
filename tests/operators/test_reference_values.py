"""Each processor's output values against a reference computed another way.

FNO is compared with neuraloperator's own FNO (``test_processors.py``); here MgNO's
V-cycle against array slicing, FEMultigrid against NumPy with scikit-fem's own
point evaluation for its prolongation, and LSM's spectral block against a loop
over patches.
"""

import itertools

import numpy as np
import scipy.special
import torch

from fenop.fem import hierarchy, unit_square
from fenop.operators import FEMultigrid
from fenop.operators.latent_spectral import NeuralSpectralBlock
from fenop.operators.mgno import MgConv


def _centre_only(conv: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[(0, 0, *(k // 2 for k in conv.weight.shape[2:]))] = value


def test_mgno_v_cycle_equals_the_cycle_written_with_slices():
    # Smoothers u <- u + ω (f - u), injection down, nearest-neighbour prolongation up:
    # convolution weights that make the V-cycle a computation of array slices.
    cycle = MgConv(1, dim=2, levels=2, pre=1, post=1).double()
    omega = {(0, 0): 0.6, (0, 1): 0.3, (1, 0): 0.5, (1, 1): 0.7}
    for (level, step), value in omega.items():
        _centre_only(cycle.smoothers[level][step], value)
    for level in range(2):
        _centre_only(cycle.operators[level][0], 1.0)  # A = I
    _centre_only(cycle.residual[0], 1.0)
    _centre_only(cycle.restrict[0], 1.0)  # stride 2, centre tap: f[::2, ::2]
    with torch.no_grad():
        cycle.prolong[0].weight.zero_()
        # A transposed convolution of stride 2 with taps 1 and 2 repeats each value twice.
        cycle.prolong[0].weight[0, 0, 1:3, 1:3] = 1.0

    f = np.random.default_rng(0).standard_normal((9, 11))
    u0 = omega[0, 0] * f
    f1 = (f - u0)[::2, ::2]
    u1 = omega[1, 0] * f1
    u1 = u1 + omega[1, 1] * (f1 - u1)  # the coarsest level smooths pre + post times
    u = u0 + np.repeat(np.repeat(u1, 2, axis=0), 2, axis=1)[:9, :11]
    u = u + omega[0, 1] * (f - u)

    got = cycle(torch.from_numpy(f)[None, None])[0, 0].detach().numpy()
    np.testing.assert_allclose(got, u, rtol=0, atol=1e-13)


def _gelu(x):
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def test_fe_multigrid_equals_numpy_with_scikit_fem_prolongation():
    torch.manual_seed(0)
    spaces = hierarchy(unit_square(3), 3)
    model = FEMultigrid(spaces, 2, 1, width=3, n_layers=1, pre=1, post=1).double()
    # Every stencil operator mixes channels only (tap 0), u -> u W: the stencils'
    # own products are checked in test_processors.py.
    weights = {}
    for name, parameter in model.named_parameters():
        if name.endswith(".weight") and parameter.ndim == 3:
            with torch.no_grad():
                parameter[1:] = 0.0
            weights[name] = parameter[0].detach().numpy()

    def mix(kind: str, level: int, step: int | None, u):
        key = f"{kind}.0.{level}" + ("" if step is None else f".{step}") + ".weight"
        return u @ weights[key]

    # Prolongation by scikit-fem's own point evaluation; restriction its transpose
    # with unit row sums (averages of nodal values).
    prolong, restrict = [], []
    for coarse, fine in itertools.pairwise(spaces):
        p = coarse.basis.probes(fine.dof_points.T).toarray()
        prolong.append(p)
        restrict.append(p.T / p.T.sum(axis=1, keepdims=True))

    def cycle(f):
        top = len(spaces) - 1
        rhs, solutions = [f], []
        for level in range(top, -1, -1):
            u = mix("smoothers", level, 0, rhs[-1])
            if level == 0:  # the coarsest smooths twice
                u = u + mix("smoothers", 0, 1, rhs[-1] - mix("operators", 0, 0, u))
            solutions.append(u)
            if level > 0:
                residual = rhs[-1] - mix("residuals", level - 1, None, u)
                rhs.append(restrict[level - 1] @ residual)
        u = solutions[-1]
        for depth in range(len(solutions) - 2, -1, -1):
            level = top - depth
            u = solutions[depth] + prolong[level - 1] @ u
            u = u + mix("smoothers", level, 1, rhs[depth] - mix("operators", level, 0, u))
        return u

    def linear(layer, u):
        return u @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()

    x = np.random.default_rng(1).standard_normal((2, 2, spaces[-1].n_dofs))
    points = spaces[-1].dof_points
    coordinates = (points - points.min(axis=0)) / np.ptp(points, axis=0)
    expected = []
    for sample in x:
        u = linear(model.lift, np.concatenate([sample.T, coordinates], axis=1))
        u = _gelu(cycle(u) + linear(model.skips[0], u))
        hidden = _gelu(linear(model.project[0], u))
        expected.append(linear(model.project[2], hidden).T)
    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-10, atol=1e-12)


def test_lsm_spectral_block_equals_a_loop_over_patches():
    torch.manual_seed(0)
    block = NeuralSpectralBlock(4, n_basis=3, n_tokens=2, patch_size=3, heads=2).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)  # 7 x 5 is padded to 9 x 6
    got = block(x).detach().numpy()

    def conv1x1(conv, patch):  # (c, p, p) -> (c', p, p)
        w = conv.weight.detach().numpy()[:, :, 0, 0]
        return np.einsum("oc,cij->oij", w, patch) + conv.bias.detach().numpy()[:, None, None]

    def attend(q, k, v):
        scores = q @ k.T
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        return (weights / weights.sum(axis=1, keepdims=True)) @ v

    tokens0 = block.tokens.detach().numpy()  # (heads, n_tokens, d)
    frequencies = block.frequencies.numpy()  # k / n_basis, k = 0, 1, 2
    spectral = block.spectral_weights.detach().numpy()  # (c, 2 n_basis)
    heads, d, p = 2, 2, 3
    padded = np.zeros((2, 4, 9, 6))
    padded[:, :, :7, :5] = x.numpy()
    expected = padded.copy()
    for b in range(2):
        for i in range(0, 9, p):
            for j in range(0, 6, p):
                patch = padded[b, :, i : i + p, j : j + p]
                keys, values = np.split(conv1x1(block.to_keys_values, patch), 2)
                queries = conv1x1(block.to_queries, patch)
                read = np.zeros_like(patch)
                for h in range(heads):
                    channels = slice(h * d, (h + 1) * d)

                    def pixels(t, channels=channels):  # (d, p, p) -> (p * p, d)
                        return t[channels].reshape(d, -1).T

                    tokens = tokens0[h] + attend(tokens0[h], pixels(keys), pixels(values))
                    # each token channel through its sine/cosine series
                    for c in range(d):
                        angles = np.pi * tokens[:, c, None] * frequencies
                        basis = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
                        tokens[:, c] = tokens[:, c] + basis @ spectral[h * d + c]
                    read[channels] = attend(pixels(queries), tokens, tokens).T.reshape(d, p, p)
                expected[b, :, i : i + p, j : j + p] = patch + read
    np.testing.assert_allclose(got, expected[:, :, :7, :5], rtol=1e-10, atol=1e-12)
