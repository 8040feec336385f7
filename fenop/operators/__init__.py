"""Operators: grid processors (FNO, MgNO, LSM), the mesh-native FEMultigrid, FEOperator,
and the hard constraints (HardConstraint, MoEConstraint)."""

from fenop.operators.constraints import HardConstraint, MoEConstraint
from fenop.operators.fe_multigrid import FEMultigrid
from fenop.operators.fe_operator import FEOperator
from fenop.operators.fno import FNO
from fenop.operators.latent_spectral import LSM
from fenop.operators.mgno import MgNO

__all__ = ["FNO", "LSM", "FEMultigrid", "FEOperator", "HardConstraint", "MgNO", "MoEConstraint"]
