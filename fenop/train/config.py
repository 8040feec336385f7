"""Training configurations: the TOML file of ``fenop train``, checked key by key.

    [data]
    path = "darcy.h5"          # a store made by `fenop generate`
    inputs = ["a"]
    outputs = ["u"]
    n_train = 800              # the first n_train samples train, the next n_test test
    n_test = 200

    [model]
    processor = "fno"          # fno | mgno | lsm | femultigrid
    resolution = 64            # grid points per axis (grid processors)
    [model.options]            # the processor's own keyword options
    n_modes = [16, 16]
    hidden_channels = 32

A stepper (a model that advances the state of a trajectory store; see
:mod:`fenop.train.stepping`) names the state instead of inputs and outputs:

    [data]
    path = "heat.h5"           # made by `fenop generate heat --steps 50`
    state = "u"                # the trajectory field advanced
    statics = []               # static fields of each sample, taken as inputs too
    history = 1                # states the model sees
    bundle = 1                 # states it predicts per call
    horizon = 20               # optional: train on the first 20 steps only
    n_train = 80               # trajectories
    n_test = 20

with, in ``[training]``, ``mode = "one_step"`` (teacher forcing), ``"pushforward"``
or ``"unrolled"``, ``unroll = 2`` (the calls those two chain) and ``noise = 0.0``;
``physics_weight`` (one-step training) adds the residual of the step.
A ``[model.constraint]`` of a stepper is the family's residual of one time step,
given the last state of the history.

FEMultigrid has no grid; instead of ``resolution`` it takes its mesh hierarchy, a
coarse mesh of the data's domain refined ``levels - 1`` times (the data's mesh may
be any mesh of that domain: fields are interpolated to and from the finest level):

    [model.hierarchy]
    domain = "square"          # square | lshape, with `resolution` vertices a side,
    resolution = 9             # or mesh = "coarse.msh" (a file, relative to this one)
    levels = 3                 # 9 -> 17 -> 33 vertices a side
    coarser = []               # optional, with a domain: coarser meshes of it below,
                               # vertices a side, e.g. [11] under resolution = 22
                               # (levels that are not nested; see FEMultigrid)

    [training]
    epochs = 50
    batch_size = 20
    lr = 1e-3
    weight_decay = 1e-4
    grad_clip = 1.0            # optional: gradients scaled to at most this norm
    schedule = "cosine"        # cosine | step | constant
    loss = "l2"                # l2 | h1
    seed = 0
    output = "runs/darcy-fno"  # checkpoints and metrics
    device = "auto"            # auto | cpu | cuda
    amp = false
    physics_weight = 0.0       # > 0: add the scaled FE residual norm to the loss (soft)
    parallel = "data"          # under torchrun: data | experts (shard the MoE's experts)

A hard constraint on the output (the store's PDE residual; see
:mod:`fenop.train.physics` for every key):

    [model.constraint]
    kind = "moe"               # moe | global
    n_basis = 16               # the default for moe; 32 for global
    experts = 16               # or dofs_per_expert = 400

Unknown keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from pathlib import Path

from fenop._checks import is_int, missing_file
from fenop._errors import InputError
from fenop._options import REQUIRED, declared_options
from fenop.fem.mesh import DOMAINS
from fenop.train.models import PROCESSORS
from fenop.train.physics import ConstraintError, constraint_table
from fenop.train.trainer import Trainer, check_settings

_REQUIRED = object()
# The Trainer's arguments that a configuration does not set: the output folder and
# device it names otherwise, what the command decides, and what the data give.
_NOT_TRAINING = ("directory", "device", "resume", "progress", "physics", "extra")
_Keys = dict[str, tuple[type | tuple[type, ...], object]]
_SCHEMA: dict[str, _Keys] = {
    "data": {
        "path": (str, _REQUIRED),
        "inputs": (list, ["a"]),
        "outputs": (list, ["u"]),
        "n_train": (int, _REQUIRED),
        "n_test": (int, _REQUIRED),
        # steppers (see the module's docstring)
        "state": (str, None),
        "statics": (list, []),
        "history": (int, 1),
        "bundle": (int, 1),
        "horizon": (int, None),
    },
    "model": {
        "processor": (str, _REQUIRED),
        "resolution": ((int, list), None),  # required for grid processors, see below
        "options": (dict, {}),
        "hierarchy": (dict, None),  # required for mesh-native processors (femultigrid)
        "constraint": (dict, None),  # a hard constraint, see fenop.train.physics
    },
    # The Trainer's own keyword options (types and defaults from its signature),
    # with the output folder and device as a file names them.
    "training": {
        **{
            name: (
                tuple(t for t in option.types if t is not type(None)),
                _REQUIRED if option.default is REQUIRED else option.default,
            )
            for name, option in declared_options(Trainer, skip=_NOT_TRAINING).items()
        },
        "output": (str, _REQUIRED),
        "device": (str, "auto"),
    },
}
_HIERARCHY: _Keys = {
    "domain": (str, "square"),
    "resolution": (int, None),
    "mesh": (str, None),
    "levels": (int, 3),
    "coarser": (list, []),
}


class ConfigError(InputError):
    """A training configuration that cannot be used; names the file and the key."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")


def read_config(path: str | os.PathLike) -> dict:
    """The checked configuration, defaults filled in, relative paths made absolute."""
    path = Path(path)
    if problem := missing_file(path):
        raise ConfigError(path, problem)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    unknown = set(raw) - set(_SCHEMA)
    if unknown:
        raise ConfigError(path, f"unknown section [{sorted(unknown)[0]}]; known: {sorted(_SCHEMA)}")
    config = {}
    for section, keys in _SCHEMA.items():
        config[section] = _checked(path, section, raw.get(section, {}), keys)
    model = config["model"]
    name = model["processor"]
    if name not in PROCESSORS:
        raise ConfigError(
            path, f"model.processor must be one of {sorted(PROCESSORS)}, got {name!r}"
        )
    if PROCESSORS[name].mesh_native:  # its levels are meshes, not a grid
        if model["hierarchy"] is None:
            raise ConfigError(path, f"model.processor {name} needs a [model.hierarchy] table")
        if model["resolution"] is not None:
            raise ConfigError(
                path, f"model.resolution is for grid processors; {name} has [model.hierarchy]"
            )
        model["hierarchy"] = _hierarchy(path, model["hierarchy"])
    else:
        if model["resolution"] is None:
            raise ConfigError(path, "missing key model.resolution")
        sides = (
            model["resolution"] if isinstance(model["resolution"], list) else [model["resolution"]]
        )
        if not sides or not all(is_int(n) and n >= 2 for n in sides):
            raise ConfigError(
                path,
                "model.resolution must be the grid's points a side (an integer of at least 2) "
                f"or a list of them, one per axis; got {model['resolution']!r}",
            )
        if model["hierarchy"] is not None:
            raise ConfigError(path, "[model.hierarchy] is for mesh-native processors only")
    data = config["data"]
    if data["state"] is not None:
        _stepper_data(path, config, raw.get("data", {}))
    elif stepping := sorted({"statics", "history", "bundle", "horizon"} & set(raw.get("data", {}))):
        raise ConfigError(path, f"data.{stepping[0]} is for a stepper: give data.state too")
    for key in ("inputs", "outputs"):
        names = config["data"][key]
        if (
            not names
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) < len(names)
        ):
            raise ConfigError(path, f"data.{key} must list distinct field names, got {names!r}")
    if data["state"] is None and set(data["inputs"]) & set(data["outputs"]):
        raise ConfigError(path, "data.inputs and data.outputs must not share a field")
    for key in ("n_train", "n_test"):
        if config["data"][key] < 1:
            raise ConfigError(path, f"data.{key} must be positive, got {config['data'][key]}")
    training = config["training"]
    settings = {k: v for k, v in training.items() if k not in ("output", "device")}
    try:
        check_settings(settings, key=lambda name: f"training.{name}")
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    if model["constraint"] is not None:
        try:
            model["constraint"] = constraint_table(model["constraint"])
        except ConstraintError as exc:
            raise ConfigError(path, str(exc)) from None
        if len(config["data"]["outputs"]) != 1:
            raise ConfigError(path, "[model.constraint] constrains one output field")
    if training["parallel"] == "experts" and (model["constraint"] or {}).get("kind") != "moe":
        raise ConfigError(
            path, 'training.parallel = "experts" shards a [model.constraint] of kind "moe"'
        )
    if data["state"] is None and (training["mode"] != "one_step" or training["noise"] > 0):
        key = "mode" if training["mode"] != "one_step" else "noise"
        raise ConfigError(path, f"training.{key} trains a stepper: give data.state")
    if data["state"] is not None:
        if model["constraint"] is not None and data["bundle"] != 1:
            raise ConfigError(path, "[model.constraint] constrains one step: data.bundle = 1")
        if training["physics_weight"] > 0 and training["mode"] != "one_step":
            raise ConfigError(
                path, 'training.physics_weight is added to one-step training (mode = "one_step")'
            )
    base = path.parent
    config["data"]["path"] = str((base / config["data"]["path"]).resolve())
    config["training"]["output"] = str((base / config["training"]["output"]).resolve())
    if model["hierarchy"] is not None and model["hierarchy"]["mesh"] is not None:
        model["hierarchy"]["mesh"] = str((base / model["hierarchy"]["mesh"]).resolve())
    return config


def _stepper_data(path: Path, config: dict, given: dict) -> None:
    """Check a stepper's ``[data]`` and set its ``inputs`` and ``outputs`` to the
    fields it reads, as the rest of a configuration speaks of fields."""
    data = config["data"]
    static = sorted({"inputs", "outputs"} & set(given))
    if static:
        raise ConfigError(
            path,
            f"data.{static[0]} is for a map between fields; a stepper reads data.state "
            "and data.statics",
        )
    for key in ("history", "bundle", "horizon"):
        if data[key] is not None and data[key] < 1:
            raise ConfigError(path, f"data.{key} must be positive, got {data[key]}")
    statics = data["statics"]
    if (
        not all(isinstance(n, str) and n for n in statics)
        or len(set(statics)) < len(statics)
        or data["state"] in statics
    ):
        raise ConfigError(
            path,
            f"data.statics must list distinct field names other than the state, got {statics!r}",
        )
    data["inputs"], data["outputs"] = [data["state"], *data["statics"]], [data["state"]]


def _checked(path: Path, section: str, given: object, keys: _Keys) -> dict:
    """The table ``given`` with defaults filled in, or an error naming the key."""
    if not isinstance(given, dict):
        raise ConfigError(path, f"[{section}] must be a table")
    for key in given:
        if key not in keys:
            raise ConfigError(path, f"unknown key {section}.{key}; known: {sorted(keys)}")
    table = {}
    for key, (kind, default) in keys.items():
        if key not in given:
            if default is _REQUIRED:
                raise ConfigError(path, f"missing key {section}.{key}")
            table[key] = default
            continue
        value = given[key]
        # bool is an int in Python; a flag given where a count is wanted is an error
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise ConfigError(path, f"{section}.{key} must be {names}, got {value!r}")
        table[key] = value
    return table


def _hierarchy(path: Path, given: dict) -> dict:
    """The checked ``[model.hierarchy]`` table: a built-in domain or a mesh file, and levels."""
    table = _checked(path, "model.hierarchy", given, _HIERARCHY)
    if table["mesh"] is not None:
        if "domain" in given or "resolution" in given:
            raise ConfigError(
                path, "model.hierarchy: give either mesh, or domain and resolution, not both"
            )
    else:
        if table["domain"] not in DOMAINS:
            raise ConfigError(
                path,
                f"model.hierarchy.domain must be one of {tuple(DOMAINS)}, got {table['domain']!r}",
            )
        if table["resolution"] is None or table["resolution"] < 2:
            raise ConfigError(
                path,
                "model.hierarchy.resolution (vertices a side of the coarsest mesh, at least 2) "
                f"is required without a mesh file, got {table['resolution']}",
            )
    if table["levels"] < 1:
        raise ConfigError(path, f"model.hierarchy.levels must be positive, got {table['levels']}")
    coarser = table["coarser"]
    if coarser:
        if table["mesh"] is not None:
            raise ConfigError(path, "model.hierarchy.coarser is for a domain, not a mesh file")
        sides = [*coarser, table["resolution"]]
        if not all(is_int(n) for n in coarser) or not all(
            2 <= a < b for a, b in itertools.pairwise(sides)
        ):
            raise ConfigError(
                path,
                "model.hierarchy.coarser must be vertices a side, increasing, each at least 2 "
                f"and below resolution = {table['resolution']}; got {coarser}",
            )
    return table
