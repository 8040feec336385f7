"""Opening a store's file and reading its header: what every reader of a store does
first, and where a file that is not a usable store is told apart (:class:`StoreError`,
naming the file and the problem). The layout is :mod:`fenop.data.store`'s."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from fenop._checks import is_int, missing_file
from fenop._errors import InputError

FORMAT_VERSION = 1


# Datasets of the layout that are not fields: the mesh, and HDF5 dimension scales.
_NOT_FIELDS = {
    "mesh_points",
    "mesh_cells",
    "time",
    "sample",
    "dof",
    "vertex",
    "cell",
    "corner",
    "axis",
}


def field_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a field of a store (a name the layout reserves, or one
    HDF5 would read as a path), or ``None``."""
    if name in _NOT_FIELDS:
        return f"a name the store's layout reserves ({', '.join(sorted(_NOT_FIELDS))})"
    if not name or "/" in name or name in (".", ".."):
        return "not a dataset name (empty, '.', '..' or holding '/')"
    return None


class StoreError(InputError):
    """A store that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path, self.problem = os.fspath(path), problem


def open_h5(path: str | os.PathLike, mode: str, *, patience: float = 60.0) -> h5py.File:
    """``h5py.File(path, mode)``, waiting while another process has the file open.

    HDF5 locks a file for as long as a process has it open: the writer of a store
    (its generation, between chunks) and its readers (``fenop info``, a resumed
    run's check) each wait for the other's brief open rather than fail. After
    ``patience`` seconds, as when a notebook keeps the file open, a StoreError
    says so.
    """
    return _waiting(lambda: h5py.File(path, mode), path, patience)


def _waiting(opener, path: str | os.PathLike, patience: float):
    """``opener()``, again while HDF5 says another process has the file locked."""
    deadline, delay = time.monotonic() + patience, 0.01
    while True:
        try:
            return opener()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StoreError(
                    path,
                    f"locked by another process that has it open (waited {patience:g} s); "
                    "close it there, or wait for that process to end",
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[h5py.File]:
    """The store open for reading; HDF5's errors about its structure inside the block
    (a damaged object header or symbol table: h5py raises KeyError, RuntimeError or
    OSError for them) become one StoreError naming the file."""
    path = Path(path)
    if problem := missing_file(path):
        raise StoreError(path, problem)
    try:
        file = open_h5(path, "r")
    except OSError as exc:
        raise StoreError(path, f"not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    with file:
        try:
            yield file
        except (KeyError, RuntimeError, OSError) as exc:
            raise StoreError(
                path, f"damaged: HDF5 cannot read its structure ({exc}); regenerate or restore it"
            ) from None


def read_header(path: str | os.PathLike) -> dict:
    """The root attributes of a store, JSON values decoded; checks the format version."""
    with _open(path) as f:
        return _header(path, f)


# Attributes of the layout and what each must hold; others are the writer's own.
_COUNTS = ("n_samples", "n_complete", "chunk_size")  # non-negative integers
_TEXT = ("pde", "element", "dirichlet")
_JSON = ("fields", "parameters")  # JSON text where written as text


def _header(path, f: h5py.File) -> dict:
    if "fenop_format" not in f.attrs:
        raise StoreError(path, "not a fenop store (no 'fenop_format' attribute)")
    header = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                if key in _JSON:
                    raise StoreError(path, f"attribute {key!r} is not valid JSON: {exc}") from None
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):  # an HDF5 array attribute: a list
            value = [
                v.decode(errors="replace") if isinstance(v, bytes) else v for v in value.tolist()
            ]
        header[key] = value
    version = header["fenop_format"]
    if not is_int(version) or version < 1:
        raise StoreError(path, f"attribute 'fenop_format' must be a format number, got {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"written in store format {version}, newer than this fenop reads "
            f"({FORMAT_VERSION}); upgrade fenop",
        )
    if "element" not in header:
        raise StoreError(path, "missing attribute 'element' (P1, P2, Q1 or Q2)")
    for key in _TEXT:
        if key in header and not isinstance(header[key], str):
            raise StoreError(path, f"attribute {key!r} must be text, got {header[key]!r}")
    for key in _COUNTS:
        if key in header and not (is_int(header[key]) and header[key] >= 0):
            raise StoreError(
                path, f"attribute {key!r} must be a non-negative integer, got {header[key]!r}"
            )
    if not isinstance(header.get("parameters", {}), dict):
        raise StoreError(
            path, f"attribute 'parameters' must be a JSON object, got {header['parameters']!r}"
        )
    # A file written by hand, or by another program, may leave out what a generated
    # store records: its fields are then its datasets of one row per sample, and it
    # is complete.
    header["fields"] = _field_names(path, f, header.get("fields"))
    if "n_samples" not in header:
        rows = {f[name].shape[0] for name in header["fields"] if name in f}
        if len(rows) > 1:
            raise StoreError(
                path, f"the fields {header['fields']} have different numbers of samples {rows}"
            )
        header["n_samples"] = rows.pop() if rows else 0
    header.setdefault("n_complete", header["n_samples"])
    if header["n_complete"] > header["n_samples"]:
        raise StoreError(
            path,
            f"attribute 'n_complete' = {header['n_complete']} exceeds 'n_samples' = "
            f"{header['n_samples']}",
        )
    return header


def _field_names(path, f: h5py.File, given) -> list[str]:
    """The store's field names: the ``fields`` attribute (a JSON list, an HDF5 array
    of strings, or names separated by commas or spaces), else every two-dimensional
    dataset (sample, dof) or three-dimensional one (sample, time, dof) at the root that
    is not part of the layout."""
    if given is None:
        names = [
            name
            for name, item in f.items()
            if name not in _NOT_FIELDS and isinstance(item, h5py.Dataset) and item.ndim in (2, 3)
        ]
        if not names:
            raise StoreError(
                path,
                "no fields: no 'fields' attribute, and no (sample, dof) or (sample, time, dof) "
                "dataset at the root",
            )
        return names
    if isinstance(given, str):
        given = given.replace(",", " ").split()
        if any(c in name for name in given for c in "[]{}\"'/"):
            raise StoreError(
                path, f"attribute 'fields' must list field names, got {' '.join(given)!r}"
            )
    if not isinstance(given, list) or not all(isinstance(v, str) and v for v in given):
        raise StoreError(path, f"attribute 'fields' must list field names, got {given!r}")
    return given
