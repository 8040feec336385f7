"""Training configurations: the TOML file of ``fenop train``, checked key by key.

    [data]
    path = "darcy.h5"          # a store made by `fenop generate`
    inputs = ["a"]
    outputs = ["u"]
    n_train = 800              # the first n_train samples train, the next n_test test
    n_test = 200

    [model]
    processor = "fno"          # fno | mgno | lsm
    resolution = 64
    [model.options]            # the processor's own keyword options
    n_modes = [16, 16]
    hidden_channels = 32

    [training]
    epochs = 50
    batch_size = 20
    lr = 1e-3
    weight_decay = 1e-4
    schedule = "cosine"        # cosine | step | constant
    loss = "l2"                # l2 | h1
    seed = 0
    output = "runs/darcy-fno"  # checkpoints and metrics
    device = "auto"            # auto | cpu | cuda
    amp = false

Unknown keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

_REQUIRED = object()
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], object]]] = {
    "data": {
        "path": (str, _REQUIRED),
        "inputs": (list, ["a"]),
        "outputs": (list, ["u"]),
        "n_train": (int, _REQUIRED),
        "n_test": (int, _REQUIRED),
    },
    "model": {
        "processor": (str, _REQUIRED),
        "resolution": ((int, list), _REQUIRED),
        "options": (dict, {}),
    },
    "training": {
        "epochs": (int, _REQUIRED),
        "batch_size": (int, 20),
        "lr": ((float, int), 1e-3),
        "weight_decay": ((float, int), 1e-4),
        "schedule": (str, "cosine"),
        "loss": (str, "l2"),
        "seed": (int, 0),
        "output": (str, _REQUIRED),
        "device": (str, "auto"),
        "amp": (bool, False),
    },
}


class ConfigError(ValueError):
    """A training configuration that cannot be used; names the file and the key."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")


def read_config(path: str | os.PathLike) -> dict:
    """The checked configuration, defaults filled in, relative paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    unknown = set(raw) - set(_SCHEMA)
    if unknown:
        raise ConfigError(path, f"unknown section [{sorted(unknown)[0]}]; known: {sorted(_SCHEMA)}")
    config = {}
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(path, f"[{section}] must be a table")
        for key in given:
            if key not in keys:
                raise ConfigError(path, f"unknown key {section}.{key}; known: {sorted(keys)}")
        config[section] = {}
        for key, (kind, default) in keys.items():
            if key not in given:
                if default is _REQUIRED:
                    raise ConfigError(path, f"missing key {section}.{key}")
                config[section][key] = default
                continue
            value = given[key]
            # bool is an int in Python; a flag given where a count is wanted is an error
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                names = (
                    kind.__name__
                    if isinstance(kind, type)
                    else " or ".join(k.__name__ for k in kind)
                )
                raise ConfigError(path, f"{section}.{key} must be {names}, got {value!r}")
            config[section][key] = value
    for key in ("n_train", "n_test", "epochs", "batch_size"):
        section = "data" if key.startswith("n_") else "training"
        if config[section][key] < 1:
            raise ConfigError(path, f"{section}.{key} must be positive, got {config[section][key]}")
    base = path.parent
    config["data"]["path"] = str((base / config["data"]["path"]).resolve())
    config["training"]["output"] = str((base / config["training"]["output"]).resolve())
    return config
