"""PDE families: parameter samplers, scikit-fem solvers and torch residuals.

>>> sorted(PDES)
['advection_diffusion', 'allen_cahn', 'darcy', 'heat', 'nonlinear_diffusion', 'poisson']
"""

from fenop.data.pdes.advection_diffusion import AdvectionDiffusion
from fenop.data.pdes.allen_cahn import AllenCahn
from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.data.pdes.darcy import Darcy
from fenop.data.pdes.heat import Heat
from fenop.data.pdes.nonlinear_diffusion import NonlinearDiffusion
from fenop.data.pdes.poisson import Poisson

PDES: dict[str, type[PDEFamily]] = {
    cls.name: cls
    for cls in (
        Darcy,
        Poisson,
        NonlinearDiffusion,
        Heat,
        AllenCahn,
        AdvectionDiffusion,
    )
}


def get_pde(name: str) -> type[PDEFamily]:
    """The PDE family called ``name``; a ValueError lists the known ones."""
    if name not in PDES:
        raise ValueError(f"unknown PDE {name!r}; known: {', '.join(sorted(PDES))}")
    return PDES[name]


__all__ = [
    "PDES",
    "AdvectionDiffusion",
    "AllenCahn",
    "Darcy",
    "DirichletResidual",
    "Heat",
    "NonlinearDiffusion",
    "PDEFamily",
    "Poisson",
    "get_pde",
]
