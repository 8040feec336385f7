"""What the constraint layers share: the conditions and update rules they offer,
their limits, and which DOFs a residual solves for."""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import nn

Condition = Literal["galerkin", "least_squares"]
# The experts' sweeps: multiplicative Schwarz (colour after colour, each from the
# field the colours before made) or restricted additive Schwarz (every expert from
# the sweep's starting field, each DOF taking its owner's correction).
Update = Literal["multiplicative", "restricted_additive"]
# The names these had before, which descriptions written then hold.
UPDATE_ALIASES = {"colours": "multiplicative", "owners": "restricted_additive"}
# How MoEConstraint's experts treat a residual that is not affine (see its docstring).
Nonlinear = Literal["linearised", "newton"]
# How the layers' global (or coarse) solve treats one: as Nonlinear, or "auto",
# by what the residual is (see HardConstraint's docstring).
GlobalSolve = Literal["auto", "linearised", "newton"]
CONDITIONS, UPDATES, NONLINEAR, GLOBAL_SOLVES = (
    typing.get_args(c) for c in (Condition, Update, Nonlinear, GlobalSolve)
)
# Solves whose scaled matrix is worse conditioned than this are reported as failed.
_CONDITION_LIMIT = 1e10


def _needs_gradient(*tensors) -> bool:
    """Whether autograd will want a gradient through any of ``tensors`` (or a dict's values)."""
    flat = [t for x in tensors for t in (x.values() if isinstance(x, dict) else [x])]
    return torch.is_grad_enabled() and any(t.requires_grad for t in flat)


def free_dofs(residual: nn.Module) -> torch.Tensor:
    """``(n_dofs,)`` bool: the DOFs a residual solves for, all but its Dirichlet DOFs
    (``residual.dirichlet``), on the CPU."""
    return ~residual.dirichlet.detach().cpu()
