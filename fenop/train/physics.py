"""The PDE side of a model: residuals from a store's description, hard constraints
built from a model description, and the soft physics loss.

:mod:`fenop.operators` knows no PDE family (it is handed a residual module); this
module is where a description names one. A constraint's description is a JSON
table, the ``constraint`` entry of a :class:`~fenop.train.models.ModelDescription`
and the ``[model.constraint]`` table of a training configuration::

    kind = "moe"            # moe | global
    n_basis = 16            # basis fields the processor emits beside its prediction
                            # (default 16 for moe, 32 for global)
    condition = "galerkin"  # galerkin | least_squares
    partition = "metis"     # metis | bisection (moe only)
    experts = 16            # or dofs_per_expert = 400
    overlap = 2
    sweeps = 3
    coarse = true           # a global solve first
    update = "colours"      # colours | owners
    nonlinear = "linearised"  # linearised | newton: the experts on a residual not affine

and, filled in by the training layer from the store, ``pde``, ``parameters`` (the
family's, to rebuild its residual on any mesh) and ``inputs`` (the residual's name
for each input field).

>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> table = constraint_table({"experts": 4, "n_basis": 8})
>>> layer = build_constraint({**table, "pde": "darcy", "parameters": {}, "inputs": ["a"]}, space)
>>> type(layer).__name__, layer.partition.n_experts
('MoEConstraint', 4)
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from fenop._errors import InputError
from fenop.data.pdes import get_pde
from fenop.fem import BisectionPartition, FunctionSpace, MetisPartition
from fenop.operators import HardConstraint, MoEConstraint
from fenop.operators.constraints import CONDITIONS, NONLINEAR, UPDATES, free_dofs

KINDS = ("moe", "global")
PARTITIONS = {"metis": MetisPartition, "bisection": BisectionPartition}
_DEFAULTS = {
    "kind": "moe",
    "n_basis": None,  # by kind: _BASIS
    "condition": "galerkin",
    "partition": "metis",
    "experts": None,
    "dofs_per_expert": None,
    "overlap": 2,
    "sweeps": 3,
    "coarse": True,
    "update": "colours",
    "nonlinear": "linearised",
    "ridge": 1e-12,
}
# Basis fields by kind. One global solve corrects only in the span of its fields:
# at equal training time on nonlinear diffusion 32 fields reach 0.0187 against
# 0.0304 with 16, at about the same cost per step (on Darcy both 0.025; BENCHMARKS.md,
# "Soft against hard"). The experts each have their own patch of 16.
_BASIS = {"moe": 16, "global": 32}
_TYPES = {
    "kind": str,
    "n_basis": int,
    "condition": str,
    "partition": str,
    "experts": int,
    "dofs_per_expert": int,
    "overlap": int,
    "sweeps": int,
    "coarse": bool,
    "update": str,
    "nonlinear": str,
    "ridge": (int, float),
}
_CHOICES = {
    "kind": KINDS,
    "condition": CONDITIONS,
    "partition": tuple(PARTITIONS),
    "update": UPDATES,
    "nonlinear": NONLINEAR,
}


# The options of the experts alone: a global constraint takes none of them.
_EXPERTS_ONLY = (
    "partition",
    "experts",
    "dofs_per_expert",
    "overlap",
    "sweeps",
    "coarse",
    "update",
    "nonlinear",
)


class ConstraintError(InputError):
    """A constraint table that cannot be used; the message names the key."""


def constraint_table(given: dict) -> dict:
    """The constraint table ``given`` checked key by key, defaults filled in.

    Raises:
        ConstraintError: an unknown key, a value of the wrong type or outside its
            choices, or a partition sized both or neither way.
    """
    if not isinstance(given, dict):
        raise ConstraintError("[model.constraint] must be a table")
    unknown = sorted(set(given) - set(_DEFAULTS) - {"pde", "parameters", "inputs"})
    if unknown:
        raise ConstraintError(
            f"unknown key model.constraint.{unknown[0]}; known: {sorted(_DEFAULTS)}"
        )
    table = {**_DEFAULTS, **given}
    if table["n_basis"] is None and table["kind"] in _BASIS:
        table["n_basis"] = _BASIS[table["kind"]]
    for key, kind in _TYPES.items():
        value = table[key]
        if value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = kind.__name__ if isinstance(kind, type) else "float"
            raise ConstraintError(f"model.constraint.{key} must be {names}, got {value!r}")
    for key, choices in _CHOICES.items():
        if table[key] not in choices:
            raise ConstraintError(
                f"model.constraint.{key} must be one of {list(choices)}, got {table[key]!r}"
            )
    for key in ("n_basis", "experts", "dofs_per_expert"):
        if table[key] is not None and table[key] < 1:
            raise ConstraintError(f"model.constraint.{key} must be positive, got {table[key]}")
    for key in ("overlap", "sweeps"):
        if table[key] < 0:
            raise ConstraintError(f"model.constraint.{key} must be non-negative, got {table[key]}")
    if not 0 <= table["ridge"] < math.inf:
        raise ConstraintError(
            f"model.constraint.ridge must be non-negative and finite, got {table['ridge']}"
        )
    if table["kind"] != "moe":  # the experts' options, set for a layer that has none
        for key in _EXPERTS_ONLY:
            if table[key] != _DEFAULTS[key]:
                raise ConstraintError(
                    f"model.constraint.{key} is for kind moe (the experts), not {table['kind']}"
                )
    if table["kind"] == "moe" and (table["experts"] is None) == (table["dofs_per_expert"] is None):
        raise ConstraintError(
            "model.constraint needs exactly one of experts and dofs_per_expert (kind moe)"
        )
    return table


def residual_for(pde: str, parameters: dict, space: FunctionSpace) -> nn.Module:
    """The residual module of the family ``pde`` with ``parameters`` (a store's
    ``pde`` and ``parameters`` attributes) on ``space``."""
    try:
        return get_pde(pde)(space, **(parameters or {})).residual()
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"cannot build the {pde!r} residual: {exc}") from None


def residual_inputs(residual: nn.Module) -> list[str]:
    """The input fields a residual module takes (its ``weak_form``'s keywords)."""
    method = getattr(residual, "weak_form", residual.forward)
    return [
        name for name, p in inspect.signature(method).parameters.items() if p.kind is p.KEYWORD_ONLY
    ]


def build_constraint(description: dict, space: FunctionSpace) -> nn.Module:
    """The constraint layer a (checked, completed) description asks for, on ``space``.

    The layer keeps ``description`` as its attribute of that name, which is how a
    model's description writes it back.
    """
    for key in ("pde", "inputs"):
        if key not in description:
            raise ConstraintError(f"a constraint description needs {key!r}")
    if description.get("kind") == "moe":
        # a description written before the option existed: the experts then solved
        # by Newton's method, and load back to the same outputs
        description = {"nonlinear": "newton", **description}
    description = constraint_table(description)  # a checkpoint's, too: checked alike
    residual = residual_for(description["pde"], description.get("parameters"), space)
    wanted = residual_inputs(residual)
    if sorted(wanted) != sorted(description["inputs"]):
        raise ConstraintError(
            f"the {description['pde']} residual takes the fields {wanted}, but the model's "
            f"inputs are {list(description['inputs'])}"
        )
    n_free = int(free_dofs(residual).sum())
    if description["n_basis"] > n_free:
        raise ConstraintError(
            f"model.constraint.n_basis = {description['n_basis']} basis fields for the "
            f"{n_free} free DOFs of the mesh: at most {n_free} can be independent"
        )
    options = {"condition": description["condition"], "ridge": float(description["ridge"])}
    try:
        if description["kind"] == "global":
            layer = HardConstraint(residual, **options)
        else:
            size = (
                {"experts": description["experts"]}
                if description["experts"] is not None
                else {"dofs_per_expert": description["dofs_per_expert"]}
            )
            layer = MoEConstraint(
                residual,
                PARTITIONS[description["partition"]](**size),
                overlap=description["overlap"],
                sweeps=description["sweeps"],
                coarse=description["coarse"],
                update=description["update"],
                nonlinear=description["nonlinear"],
                **options,
            )
    except ValueError as exc:  # the layer's own checks against this mesh (too many experts)
        raise ConstraintError(str(exc)) from None
    layer.description = dict(description)
    return layer


class PhysicsLoss(nn.Module):
    """The soft constraint: the FE residual's norm on the free DOFs, relative to that
    of the zero field, averaged over the batch: ``mean_b |R(u_b)| / |R(0)|``.

    Args:
        residual: a residual module ``R(u, **inputs)``.
        inputs: the residual's name for each input channel.

    Shapes:
        ``prediction (B, 1, n)``, ``x (B, C_in, n)`` -> a scalar.
    """

    def __init__(self, residual: nn.Module, inputs):
        super().__init__()
        self.residual, self.inputs = residual, list(inputs)
        self.register_buffer("free", free_dofs(residual), persistent=False)

    def forward(self, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        inputs = {name: x[:, i] for i, name in enumerate(self.inputs)}
        r = self.residual(prediction[:, 0], **inputs)[..., self.free]
        r0 = self.residual(torch.zeros_like(prediction[:, 0]), **inputs)[..., self.free]
        return (r.norm(dim=-1) / r0.norm(dim=-1).clamp_min(1e-30)).mean()
