"""PDE families: parameter samplers, scikit-fem solvers and torch residuals.

>>> sorted(PDES)
['allen_cahn', 'darcy', 'heat', 'nonlinear_diffusion', 'poisson']
"""

from fenop.data.pdes.allen_cahn import AllenCahn
from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.data.pdes.darcy import Darcy
from fenop.data.pdes.heat import Heat
from fenop.data.pdes.nonlinear_diffusion import NonlinearDiffusion
from fenop.data.pdes.poisson import Poisson

PDES: dict[str, type[PDEFamily]] = {
    cls.name: cls for cls in (Darcy, Poisson, NonlinearDiffusion, Heat, AllenCahn)
}


def get_pde(name: str) -> type[PDEFamily]:
    """The PDE family called ``name``; a ValueError lists the known ones."""
    if name not in PDES:
        raise ValueError(f"unknown PDE {name!r}; known: {', '.join(sorted(PDES))}")
    return PDES[name]


__all__ = [
    "PDES",
    "AllenCahn",
    "Darcy",
    "DirichletResidual",
    "Heat",
    "NonlinearDiffusion",
    "PDEFamily",
    "Poisson",
    "get_pde",
]
