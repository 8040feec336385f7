"""FEOperator with a hard constraint: every processor, exact Dirichlet values, the
Galerkin condition met, gradients to the processor's weights."""

import pytest
import torch

from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, MetisPartition, hierarchy, unit_square
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, HardConstraint, MgNO, MoEConstraint
from tests.helpers import PLAIN

SPACE = FunctionSpace(unit_square(9), dirichlet="boundary")
N_BASIS = 3
PROCESSORS = {
    "fno": lambda: (FNO(4, 1 + N_BASIS, n_modes=(4, 4), hidden_channels=8), 8),
    "mgno": lambda: (MgNO(4, 1 + N_BASIS, grid=(8, 8), width=4, n_layers=1), 8),
    "lsm": lambda: (LSM(4, 1 + N_BASIS, width=4, depth=2), 8),
    "femultigrid": lambda: (
        FEMultigrid(hierarchy(unit_square(5), 2), 1, 1 + N_BASIS, width=4, n_layers=1),
        None,
    ),
}


def _sample():
    family = get_pde("darcy")(SPACE)
    sample = family.sample(0, 1)
    return family.residual(), torch.from_numpy(sample["a"])[None]


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("kind", ["global", "moe"])
def test_the_output_meets_the_galerkin_condition_with_every_processor(name, kind):
    torch.manual_seed(0)
    residual, a = _sample()
    processor, resolution = PROCESSORS[name]()
    constraint = (
        HardConstraint(residual, **PLAIN)
        if kind == "global"
        else MoEConstraint(residual, MetisPartition(experts=2), sweeps=2, **PLAIN)
    )
    model = FEOperator(
        SPACE,
        SPACE,
        processor.double(),
        resolution=resolution,
        constraint=constraint,
        input_stats=([7.5], [4.5]),
    )
    assert model.out_channels == 1 and model.n_basis == N_BASIS
    u = model(a[:, None])
    assert u.shape == (1, 1, SPACE.n_dofs)
    assert u[..., SPACE.boundary_dofs].abs().max() == 0.0
    assert bool(constraint.report["converged"].all())
    if kind == "global":
        # the basis the processor emitted, as the constraint saw it
        outputs = {}
        handle = constraint.register_forward_hook(
            lambda module, args, kwargs, out: outputs.update(basis=args[1]), with_kwargs=True
        )
        u = model(a[:, None])
        handle.remove()
        basis = outputs["basis"]
        # a grid processor's stays on its grid (the layer combines the fields in the
        # grid's hats): the fields are its decoder's interpolants
        assert basis.shape[2:] == ((SPACE.n_dofs,) if resolution is None else (8, 8))
        if resolution is not None:
            basis = model.decoder(basis)
        basis = torch.where(residual.dirichlet, 0.0, basis)
        galerkin = basis @ residual(u[:, 0], a=a)[..., None]
        scale = basis.abs().amax() * residual(torch.zeros_like(u[:, 0]), a=a).norm()
        assert galerkin.abs().max() < 1e-8 * scale
    u.square().sum().backward()
    assert all(p.grad is not None for p in processor.parameters() if p.requires_grad)


def test_constraint_arguments_are_checked():
    residual, _ = _sample()
    net = MgNO(4, 1, grid=(8, 8), width=4, n_layers=1)
    with pytest.raises(ValueError, match="at least 2 channels"):
        FEOperator(SPACE, SPACE, net, resolution=8, constraint=HardConstraint(residual, **PLAIN))
    other = FunctionSpace(unit_square(5), dirichlet="boundary")
    net = MgNO(4, 2, grid=(8, 8), width=4, n_layers=1)
    with pytest.raises(ValueError, match="built on the residual of `space_out`"):
        FEOperator(other, other, net, resolution=8, constraint=HardConstraint(residual, **PLAIN))
    with pytest.raises(ValueError, match="must name each of the 1 input"):
        FEOperator(
            SPACE,
            SPACE,
            net,
            resolution=8,
            constraint=HardConstraint(residual, **PLAIN),
            constraint_inputs=("a", "f"),
        )
    model = FEOperator(
        SPACE, SPACE, net, resolution=8, constraint=HardConstraint(residual, **PLAIN)
    )
    with pytest.raises(ValueError, match="needs a `constraint` on the new mesh"):
        model.transfer(FunctionSpace(unit_square(17), dirichlet="boundary"))
