"""PDE families: parameter samplers, scikit-fem solvers and torch residuals.

>>> sorted(PDES)
['darcy', 'nonlinear_diffusion', 'poisson']
"""

from fenop.data.pdes.base import PDEFamily
from fenop.data.pdes.darcy import Darcy
from fenop.data.pdes.nonlinear_diffusion import NonlinearDiffusion
from fenop.data.pdes.poisson import Poisson

PDES: dict[str, type[PDEFamily]] = {cls.name: cls for cls in (Darcy, Poisson, NonlinearDiffusion)}


def get_pde(name: str) -> type[PDEFamily]:
    """The PDE family called ``name``; a ValueError lists the known ones."""
    if name not in PDES:
        raise ValueError(f"unknown PDE {name!r}; known: {', '.join(sorted(PDES))}")
    return PDES[name]


__all__ = ["PDES", "Darcy", "NonlinearDiffusion", "PDEFamily", "Poisson", "get_pde"]
