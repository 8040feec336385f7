"""Models are descriptions: the processor registry, and one description of a model.

A :class:`ModelDescription` says everything needed to build an
:class:`~fenop.operators.FEOperator` (weights aside): the processor's registered
name and options, the FE spaces, the grid resolution or the mesh hierarchy, and the
normalisation statistics. One function builds a model from it (:func:`build_model`) and
one reads it back off a model (:func:`describe_model`); a training configuration
becomes a description (:mod:`fenop.train.run`), and a checkpoint's
``config.json`` holds one in JSON (:meth:`ModelDescription.to_json`).

A new processor is a module in :mod:`fenop.operators` whose class derives from
:class:`~fenop.operators.processor.Processor`, plus one line in :data:`PROCESSORS`.

>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> description = ModelDescription("mgno", space, space, options={"width": 4}, resolution=8)
>>> model = build_model(description)
>>> describe_model(model).options["width"], model.processor.in_channels
(4, 4)
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np

from fenop._checks import unknown_options
from fenop._errors import InputError
from fenop.data.store import dirichlet_label
from fenop.fem import FunctionSpace, Normalizer, hierarchy, is_nested
from fenop.fem.encoders import extra_channels
from fenop.fem.mesh import mesh_from_arrays
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO

# name -> processor class: the registry of the configurations and checkpoints.
PROCESSORS = {
    "fno": FNO,
    "mgno": MgNO,
    "lsm": LSM,
    "femultigrid": FEMultigrid,
}


class DescriptionError(InputError):
    """A model description that cannot be built or written; the message says why."""


@dataclasses.dataclass
class ModelDescription:
    """What an :class:`~fenop.operators.FEOperator` is, weights aside.

    Args:
        processor: a name in :data:`PROCESSORS`.
        space_in, space_out: the FE spaces of input and output fields.
        in_channels, out_channels: fields in and out (the processor of a grid
            model takes the encoder's mask and coordinate channels on top).
        options: the processor's keyword options (its constructor's).
        resolution: grid points per axis (grid processors).
        levels: the FE spaces of a mesh-native processor, coarsest first.
        input_stats, output_stats: normalisation of inputs and outputs.
        constraint: the hard constraint's description, a table of
            :mod:`fenop.train.physics` (its processor emits ``n_basis`` basis fields
            beside the ``out_channels`` output), or ``None``.
    """

    processor: str
    space_in: FunctionSpace
    space_out: FunctionSpace
    in_channels: int = 1
    out_channels: int = 1
    options: dict = dataclasses.field(default_factory=dict)
    resolution: int | tuple[int, ...] | None = None
    levels: list[FunctionSpace] | None = None
    input_stats: Normalizer | None = None
    output_stats: Normalizer | None = None
    constraint: dict | None = None

    @property
    def processor_class(self) -> type:
        if self.processor not in PROCESSORS:
            raise DescriptionError(
                f"unknown processor {self.processor!r}; known: {sorted(PROCESSORS)}"
            )
        return PROCESSORS[self.processor]

    # -- JSON (a checkpoint's config.json, format 1) ----------------------------------

    def to_json(self) -> dict:
        """The description as ``config.json`` stores it under ``"model"``.

        The layout is checkpoint format 1's: ``options`` holds the processor's
        constructor arguments, channels included; a mesh-native processor's levels
        are its coarsest mesh and their number when each level refines the one
        before (``coarse``), else every level's mesh (``spaces``), so that a fenop
        that knows only nested hierarchies refuses it rather than refining.
        """
        cls = self.processor_class
        options = {
            "in_channels": self._processor_in_channels(),
            "out_channels": self._processor_out_channels(),
            **_json_options(cls, self.options),
        }
        if cls.mesh_native:
            options["levels"] = len(self.levels)
            if is_nested(self.levels):
                options["coarse"] = _space_json(self.levels[0])
            else:
                options["spaces"] = [_space_json(s) for s in self.levels]
        resolution = self.resolution
        config = {
            "processor": self.processor,
            "options": options,
            "resolution": list(resolution) if isinstance(resolution, tuple) else resolution,
            "space_in": _space_json(self.space_in),
            "space_out": _space_json(self.space_out),
            "input_stats": None if self.input_stats is None else self.input_stats.to_json(),
            "output_stats": None if self.output_stats is None else self.output_stats.to_json(),
        }
        if self.constraint is not None:
            config["constraint"] = self.constraint
        return config

    @classmethod
    def from_json(cls, config: dict) -> ModelDescription:
        """The description :meth:`to_json` wrote (or any fenop of format 1)."""
        try:
            options = dict(config["options"])
            name = config["processor"]
            space_in, space_out = _space(config["space_in"]), _space(config["space_out"])
            in_channels, out_channels = options.pop("in_channels"), options.pop("out_channels")
            constraint = config.get("constraint")
            if constraint is not None:
                out_channels -= constraint["n_basis"]  # the processor's are basis fields too
            levels = None
            if name in PROCESSORS and PROCESSORS[name].mesh_native:
                n_levels = options.pop("levels")
                if "spaces" in options:
                    levels = [_space(s) for s in options.pop("spaces")]
                    if len(levels) != n_levels:
                        raise DescriptionError(f"{len(levels)} meshes for {n_levels} levels")
                else:
                    coarse = _space(options.pop("coarse"))
                    dirichlet = "boundary" if len(coarse.boundary_dofs) else None
                    levels = hierarchy(
                        coarse.mesh, n_levels, degree=coarse.degree, dirichlet=dirichlet
                    )
            else:
                # The grid processor's channels count the encoder's; the description's not.
                in_channels -= extra_channels(space_in.dim)
            resolution = config["resolution"]
            return cls(
                name,
                space_in,
                space_out,
                in_channels=in_channels,
                out_channels=out_channels,
                options=options,
                resolution=tuple(resolution) if isinstance(resolution, list) else resolution,
                levels=levels,
                input_stats=_stats(config["input_stats"]),
                output_stats=_stats(config["output_stats"]),
                constraint=constraint,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DescriptionError):
                raise
            if isinstance(exc, KeyError):
                raise DescriptionError(f"the model description lacks {exc}") from None
            raise DescriptionError(f"not a model description: {exc}") from None

    def _processor_out_channels(self) -> int:
        extra = 0 if self.constraint is None else self.constraint["n_basis"]
        return self.out_channels + extra

    def _processor_in_channels(self) -> int:
        if self.processor_class.mesh_native:
            return self.in_channels
        return self.in_channels + extra_channels(self.space_in.dim)


def build_model(description: ModelDescription) -> FEOperator:
    """A freshly initialised model as ``description`` says.

    Raises:
        DescriptionError: an unknown processor or option, or options the processor
            refuses; the message names them.
    """
    cls = description.processor_class
    if problem := unknown_options(cls, description.options, name=cls.__name__):
        raise DescriptionError(problem)
    channels = (description._processor_in_channels(), description._processor_out_channels())
    options = dict(description.options)
    try:
        if cls.mesh_native:
            if description.levels is None:
                raise DescriptionError(f"{cls.__name__} needs its mesh levels")
            processor = cls(description.levels, *channels, **options)
        else:
            resolution = description.resolution
            if resolution is None:
                raise DescriptionError(f"{cls.__name__} needs a grid resolution")
            dim = description.space_in.dim
            grid = tuple(resolution) if isinstance(resolution, tuple) else (resolution,) * dim
            if "grid" in inspect.signature(cls).parameters:
                # A processor built for a grid size (MgNO: its levels) gets the model's.
                options.setdefault("grid", grid)
            processor = cls(*channels, **options)
            check = getattr(processor, "check_grid", None)  # a grid it cannot work on
            if check is not None:
                check(grid)
    except TypeError as exc:  # an option of the wrong kind, which the processor names
        raise DescriptionError(str(exc)) from None
    except ValueError as exc:  # a value the processor refuses, which it names
        raise DescriptionError(str(exc)) from None
    constrained = {}
    if description.constraint is not None:
        from fenop.train.physics import build_constraint

        if description.out_channels != 1:  # n_basis does not match the processor's channels
            raise DescriptionError(
                f"a constraint constrains one output field; with n_basis = "
                f"{description.constraint.get('n_basis')} this model would have "
                f"{description.out_channels}"
            )

        constrained = {
            "constraint": build_constraint(description.constraint, description.space_out),
            "constraint_inputs": description.constraint["inputs"],
        }
    try:
        return FEOperator(
            description.space_in,
            description.space_out,
            processor,
            resolution=None if cls.mesh_native else description.resolution,
            input_stats=description.input_stats,
            output_stats=description.output_stats,
            **constrained,
        )
    except ValueError as exc:  # a grid, spaces or statistics that do not fit together
        if cls.mesh_native:  # the data's mesh against the hierarchy's: the caller's to say
            raise
        raise DescriptionError(str(exc)) from None


def describe_model(model: FEOperator) -> ModelDescription:
    """The description that :func:`build_model` makes ``model``'s architecture from again.

    Raises:
        DescriptionError: the processor is not registered.
    """
    processor = model.processor
    name = next((n for n, cls in PROCESSORS.items() if type(processor) is cls), None)
    if name is None:
        raise DescriptionError(
            f"cannot describe a processor of type {type(processor).__name__}: it is not "
            f"in fenop.train.models.PROCESSORS ({', '.join(PROCESSORS)})"
        )
    constraint = None
    if model.constraint is not None:
        constraint = getattr(model.constraint, "description", None)
        if constraint is None:
            raise DescriptionError(
                "a constraint made by hand cannot be described; build it with "
                "fenop.train.physics.build_constraint (or from a [model.constraint] table)"
            )
    return ModelDescription(
        name,
        model.space_in,
        model.space_out,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        options=dict(processor.options),
        resolution=model.resolution,
        levels=list(processor.spaces) if processor.mesh_native else None,
        input_stats=model.input_stats,
        output_stats=model.output_stats,
        constraint=constraint,
    )


# -- pieces of the JSON layout ----------------------------------------------------------


def _json_options(cls: type, options: dict) -> dict:
    """``options`` for JSON: a value that JSON cannot hold is left out where it is the
    constructor's default (it is the default again when built), else refused."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.default is not p.empty
    }
    written = {}
    for key, value in options.items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            if key in defaults and value is defaults[key]:
                continue
            raise DescriptionError(
                f"{cls.__name__} option {key}={value!r} cannot be written to JSON "
                "(a model with it cannot be checkpointed)"
            ) from None
        written[key] = value
    return written


def _space_json(space: FunctionSpace) -> dict:
    mesh = space.mesh
    return {
        "degree": space.degree,
        "element": space.element,
        "dirichlet": dirichlet_label(space),
        "mesh": {
            "type": type(mesh).__name__,
            "points": mesh.p.T.tolist(),
            "cells": mesh.t.T.tolist(),
        },
    }


def _space(config: dict) -> FunctionSpace:
    described = config["mesh"]
    mesh = mesh_from_arrays(
        np.asarray(described["points"], dtype=np.float64),
        np.asarray(described["cells"], dtype=np.int64),
    )
    if type(mesh).__name__ != described["type"]:
        raise DescriptionError(
            f"a mesh described as {described['type']!r} has the shape of a {type(mesh).__name__}"
        )
    dirichlet = "boundary" if config["dirichlet"] == "boundary" else None
    return FunctionSpace(mesh, degree=config["degree"], dirichlet=dirichlet)


def _stats(config) -> Normalizer | None:
    return None if config is None else Normalizer.from_json(config)
