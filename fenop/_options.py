"""Options declared once: a callable's keyword-only arguments, read from its signature.

A class's constructor is where its options are declared, with their types
(annotations, ``Literal[...]`` for a choice) and defaults. A configuration table
that sets them (``[model.constraint]``, ``[training]``) reads that declaration
instead of keeping its own list, so an option added to the constructor is
settable, typed and defaulted everywhere at once.

>>> from typing import Literal
>>> def solver(space, *, tol: float = 1e-8, steps: int = 10,
...            method: Literal["cg", "lu"] = "cg"): ...
>>> options = declared_options(solver)
>>> sorted(options), options["method"].choices
(['method', 'steps', 'tol'], ('cg', 'lu'))
>>> options["tol"].check(1, "solver.tol")   # an int is a float too
1
>>> options["steps"].check("ten", "solver.steps")
Traceback (most recent call last):
ValueError: solver.steps must be int, got 'ten'
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option: its name, the types a value may have, its default
    (:data:`REQUIRED` for none) and, for a ``Literal``, its choices."""

    name: str
    types: tuple[type, ...]
    default: object
    choices: tuple | None = None

    def check(self, value: object, key: str) -> object:
        """``value`` if this option takes it, else a ValueError naming ``key``."""
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != isinstance(
                self.choices[0], bool
            ):
                raise ValueError(f"{key} must be one of {list(self.choices)}, got {value!r}")
            return value
        # bool is an int in Python; a flag given where a count is wanted is an error
        if not isinstance(value, self.types) or (
            isinstance(value, bool) and bool not in self.types
        ):
            # (None, where allowed, is a default's marker that TOML cannot write)
            names = " or ".join(t.__name__ for t in self.types if t is not type(None))
            raise ValueError(f"{key} must be {names}, got {value!r}")
        return value


REQUIRED = inspect.Parameter.empty


def declared_options(target: Callable, *, skip: tuple[str, ...] = ()) -> dict[str, Option]:
    """The keyword-only options of ``target`` (a function or a class), in order, but
    those in ``skip``; their types from the annotations (``float`` takes an int too).
    """
    function = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(function)
    options = {}
    for name, parameter in inspect.signature(target).parameters.items():
        if parameter.kind is not parameter.KEYWORD_ONLY or name in skip:
            continue
        annotation = hints.get(name, object)
        choices = None
        if typing.get_origin(annotation) is typing.Literal:
            choices = typing.get_args(annotation)
            kinds = tuple({type(c) for c in choices})
        else:
            kinds = _types(annotation)
        options[name] = Option(name, kinds, parameter.default, choices)
    return options


def _types(annotation) -> tuple[type, ...]:
    """The runtime types an annotation admits: ``int | None`` -> ``(int, NoneType)``;
    ``float`` admits ``int``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for part in typing.get_args(annotation) for t in _types(part))
    if annotation is None or annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (float, int)
    origin = typing.get_origin(annotation)
    return (origin if isinstance(origin, type) else annotation,)
