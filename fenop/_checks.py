"""Checks of what users pass in (options, file paths), shared by the places that take it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path


def unknown_options(target: Callable, given: Iterable[str], *, name: str) -> str | None:
    """What is wrong with the keyword options ``given`` for ``target``, or ``None``.

    ``None`` too where ``target`` takes any keyword (``**options``): whatever it
    passes them on to checks them.

    >>> def solver(space, *, tol=1e-8, steps=10): ...
    >>> unknown_options(solver, ["tol", "step"], name="solver")
    "solver has no option 'step'; its options: tol, steps"
    """
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    accepted = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    unknown = [option for option in given if option not in accepted]
    if not unknown:
        return None
    return (
        f"{name} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}"
    )


def missing_folder(path: Path) -> str | None:
    """Why ``path`` cannot be written (its folder does not exist), or ``None``."""
    if path.parent.is_dir():
        return None
    return f"cannot be written, folder {path.parent} does not exist"


def missing_file(path: Path) -> str | None:
    """Why ``path`` is not a file to read (``"no such file"``, ``"a directory, not a
    file"``), or ``None`` if it is one."""
    if path.is_file():
        return None
    return "a directory, not a file" if path.is_dir() else "no such file"


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer and not a flag (``bool`` is an ``int`` in Python).

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def check_counts(owner: str, **counts: tuple[object, int]) -> None:
    """Raise a ValueError naming the first of ``counts`` (``name=(value, least)``)
    that is not an integer of at least ``least``: a processor's widths, layers and
    depths, which torch would otherwise take (zero-sized layers) or fail on later.

    >>> check_counts("MgNO", width=(8, 1), n_layers=(0, 1))
    Traceback (most recent call last):
    ValueError: MgNO: `n_layers` must be an integer of at least 1, got 0
    """
    for name, (value, least) in counts.items():
        if not is_int(value) or value < least:
            raise ValueError(
                f"{owner}: `{name}` must be an integer of at least {least}, got {value!r}"
            )
