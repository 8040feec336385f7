"""The PDE side of a model: residuals from a store's description, hard constraints
built from a model description, and the soft physics loss.

:mod:`fenop.operators` knows no PDE family (it is handed a residual module); this
module is where a description names one. A constraint's description is a JSON
table, the ``constraint`` entry of a :class:`~fenop.train.models.ModelDescription`
and the ``[model.constraint]`` table of a training configuration::

    kind = "moe"            # moe (MoEConstraint) | global (HardConstraint)
    n_basis = 16            # basis fields the processor emits beside its prediction
                            # (default 16 for moe, 32 for global)
    partition = "metis"     # metis | bisection (moe only)
    experts = 16            # or dofs_per_expert = 400 (moe only: the partition's;
                            # neither: dofs_per_expert = 256)

and every keyword argument of the kind's layer, with its default: ``condition``,
``ridge``, ``max_iterations``, ``tolerance``, ``chord``, ``smoothing``, ``global_solve``,
``coarse_grid``, ``conserve`` and ``frozen_jacobian`` for both kinds, and
``overlap``, ``sweeps``, ``coarse``, ``update`` and ``nonlinear`` for the experts
(:class:`~fenop.operators.MoEConstraint`). Their types, defaults and choices are read
from the layers' signatures (:mod:`fenop._options`), so there is one declaration of
each. Filled in by the training layer from the store: ``pde``, ``parameters`` (the
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

import torch
from torch import nn

from fenop._errors import InputError
from fenop._options import Option, declared_options
from fenop.data.pdes import get_pde
from fenop.fem import BisectionPartition, FunctionSpace, MetisPartition
from fenop.operators import HardConstraint, MoEConstraint
from fenop.operators.constraints import UPDATE_ALIASES, free_dofs

# A constraint's kinds, and the layer each builds; its options are that layer's
# keyword arguments (fenop._options), and for experts their partition's too.
KINDS = {"moe": MoEConstraint, "global": HardConstraint}
PARTITIONS = {"metis": MetisPartition, "bisection": BisectionPartition}
# Basis fields by kind. One global solve corrects only in the span of its fields:
# at equal training time on nonlinear diffusion 32 fields do much better than 16,
# at about the same cost per step, and on Darcy as well (BENCHMARKS.md, "Soft
# against hard"). The experts each have their own patch of 16.
_BASIS = {"moe": 16, "global": 32}
# The experts' size where a table gives neither experts nor dofs_per_expert. With
# the layers' default cycle at 1.7e4 DOFs (Darcy, 150 s of training), 256 DOFs an
# expert (K = 64) had 0.78x the L2 error of 1000 or 4000; 64 had 0.61x but a 1.4x
# step and inference slower than the FE solve (BENCHMARKS.md, "The experts' size").
_DOFS_PER_EXPERT = 256
# The table's own keys, beside the layer's options.
_TABLE = {
    "kind": Option("kind", (str,), "moe", tuple(KINDS)),
    "n_basis": Option("n_basis", (int, type(None)), None),  # None: by kind, _BASIS
    "partition": Option("partition", (str,), "metis", tuple(PARTITIONS)),
}
# Filled in from the store by the training layer (see the module docstring).
_DESCRIBED = ("pde", "parameters", "inputs")


def constraint_options(kind: str) -> dict[str, Option]:
    """The options of a ``[model.constraint]`` table of ``kind``: its own keys, the
    layer's keyword arguments and, for experts, their partition's."""
    options = dict(_TABLE)
    if kind != "moe":
        del options["partition"]
    options.update(declared_options(KINDS[kind]))
    if kind == "moe":
        options.update(declared_options(MetisPartition))
    return options


class ConstraintError(InputError):
    """A constraint table that cannot be used; the message names the key."""


def constraint_table(given: dict) -> dict:
    """The constraint table ``given`` checked key by key, defaults filled in.

    Options of another kind than ``given``'s are refused unless at their default
    (descriptions written before the kinds had options of their own hold them all),
    and left out of the table.

    Raises:
        ConstraintError: an unknown key, a value of the wrong type or outside its
            choices, or a partition sized both or neither way.
    """
    if not isinstance(given, dict):
        raise ConstraintError("[model.constraint] must be a table")
    kind = _checked(_TABLE["kind"], given.get("kind", "moe"))
    options = constraint_options(kind)
    every = {name: o for k in KINDS for name, o in constraint_options(k).items()}
    unknown = sorted(set(given) - set(every) - set(_DESCRIBED))
    if unknown:
        raise ConstraintError(f"unknown key model.constraint.{unknown[0]}; known: {sorted(every)}")
    table = {name: option.default for name, option in options.items()}
    if isinstance(given.get("update"), str) and given["update"] in UPDATE_ALIASES:
        # a description written before the rename
        given = {**given, "update": UPDATE_ALIASES[given["update"]]}
    for key, value in given.items():
        if key in _DESCRIBED or key in options:
            table[key] = value if key in _DESCRIBED else _checked(options[key], value)
        elif value != every[key].default:  # another kind's option, set
            raise ConstraintError(
                f"model.constraint.{key} is for kind moe (the experts), not {kind}"
            )
    if table["n_basis"] is None:
        table["n_basis"] = _BASIS[kind]
    for key in ("n_basis", "experts", "dofs_per_expert"):
        if table.get(key) is not None and table[key] < 1:
            raise ConstraintError(f"model.constraint.{key} must be positive, got {table[key]}")
    if kind == "moe" and table["experts"] is not None and table["dofs_per_expert"] is not None:
        raise ConstraintError(
            "model.constraint takes one of experts and dofs_per_expert (kind moe), not both"
        )
    if kind == "moe" and table["experts"] is None and table["dofs_per_expert"] is None:
        table["dofs_per_expert"] = _DOFS_PER_EXPERT
    return table


def _checked(option: Option, value):
    try:
        return option.check(value, f"model.constraint.{option.name}")
    except ValueError as exc:
        raise ConstraintError(str(exc)) from None


def residual_for(
    pde: str,
    parameters: dict,
    space: FunctionSpace,
    *,
    inputs: list[str] | None = None,
    named: str = "the inputs",
) -> nn.Module:
    """The residual module of the family ``pde`` with ``parameters`` (a store's
    ``pde`` and ``parameters`` attributes) on ``space``; with ``inputs``, a
    ConstraintError unless it takes exactly those fields (``named``: what the
    message calls them)."""
    try:
        residual = get_pde(pde)(space, **(parameters or {})).residual()
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"cannot build the {pde!r} residual: {exc}") from None
    wanted = residual_inputs(residual)
    if inputs is not None:  # None: a channel the residual does not take
        inputs = [name for name in inputs if name is not None]
    if inputs is not None and sorted(wanted) != sorted(inputs):
        raise ConstraintError(
            f"the {pde} residual takes the fields {wanted}, but {named} are {list(inputs)}"
        )
    return residual


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
    # A description written before an option existed loads back to the same outputs:
    # the experts then solved by Newton's method; no layer smoothed or had a grid,
    # and the global solve was Newton's.
    legacy = {"smoothing": 0, "coarse_grid": 0, "global_solve": "newton"}
    if description.get("kind") == "moe":
        legacy["nonlinear"] = "newton"
    description = {**legacy, **description}
    description = constraint_table(description)  # a checkpoint's, too: checked alike
    residual = residual_for(
        description["pde"],
        description.get("parameters"),
        space,
        inputs=description["inputs"],
        named="the model's inputs",
    )
    n_free = int(free_dofs(residual).sum())
    if description["n_basis"] > n_free:
        raise ConstraintError(
            f"model.constraint.n_basis = {description['n_basis']} basis fields for the "
            f"{n_free} free DOFs of the mesh: at most {n_free} can be independent"
        )
    layer_options = {key: description[key] for key in declared_options(KINDS[description["kind"]])}
    try:
        if description["kind"] == "global":
            layer = HardConstraint(residual, **layer_options)
        else:
            size = {key: description[key] for key in declared_options(MetisPartition)}
            size = {key: value for key, value in size.items() if value is not None}
            partition = PARTITIONS[description["partition"]](**size)
            layer = MoEConstraint(residual, partition, **layer_options)
    except ValueError as exc:  # the layer's own checks against this mesh (too many experts)
        raise ConstraintError(str(exc)) from None
    layer.description = dict(description)
    return layer


class PhysicsLoss(nn.Module):
    """The soft constraint: the FE residual's norm on the free DOFs, relative to that
    of the zero field, averaged over the batch: ``mean_b |R(u_b)| / |R(0)|``.

    Args:
        residual: a residual module ``R(u, **inputs)``.
        inputs: the residual's name for each input channel (``None`` for a channel
            it does not take: a stepper's older states).

    Shapes:
        ``prediction (B, 1, n)``, ``x (B, C_in, n)`` -> a scalar.
    """

    def __init__(self, residual: nn.Module, inputs):
        super().__init__()
        self.residual, self.inputs = residual, list(inputs)
        self.register_buffer("free", free_dofs(residual), persistent=False)

    def forward(self, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        inputs = {name: x[:, i] for i, name in enumerate(self.inputs) if name is not None}
        r = self.residual(prediction[:, 0], **inputs)[..., self.free]
        r0 = self.residual(torch.zeros_like(prediction[:, 0]), **inputs)[..., self.free]
        return (r.norm(dim=-1) / r0.norm(dim=-1).clamp_min(1e-30)).mean()
