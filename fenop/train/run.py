"""From a training configuration to a trained checkpoint (what ``fenop train`` runs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fenop._checks import unknown_options
from fenop.data import FieldDataset, read_header
from fenop.fem import FunctionSpace, hierarchy, load_mesh
from fenop.fem.mesh import DOMAINS
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO
from fenop.train.config import ConfigError, read_config
from fenop.train.trainer import Trainer, resolve_device

_GRID_PROCESSORS = {"fno": FNO, "mgno": MgNO, "lsm": LSM}


def build_from_config(config: dict, *, path: str | os.PathLike = "<config>"):
    """Datasets and a fresh model for a checked configuration (see :mod:`fenop.train.config`).

    Returns:
        ``(model, train_set, test_set)``.
    """
    data, model_config = config["data"], config["model"]
    header = read_header(data["path"])
    n_train, n_test = data["n_train"], data["n_test"]
    if n_train + n_test > int(header["n_samples"]):
        raise ConfigError(
            path,
            f"data.n_train + data.n_test = {n_train + n_test} exceeds the "
            f"{header['n_samples']} samples of {data['path']}",
        )
    fields = {"inputs": data["inputs"], "outputs": data["outputs"]}
    train = FieldDataset(data["path"], **fields, indices=range(n_train))
    test = FieldDataset(data["path"], **fields, indices=range(n_train, n_train + n_test))
    name = model_config["processor"]
    if name != "femultigrid" and name not in _GRID_PROCESSORS:
        raise ConfigError(
            path,
            f"model.processor must be one of {sorted([*_GRID_PROCESSORS, 'femultigrid'])}, "
            f"got {name!r}",
        )
    space = train.space
    options = dict(model_config["options"])
    for key in ("n_modes", "grid"):
        if key in options:
            options[key] = tuple(options[key])
    a, u = train.normalizer(data["inputs"]), train.normalizer(data["outputs"])
    stats = {
        "input_stats": (a.mean.tolist(), a.std.tolist()),
        "output_stats": (u.mean.tolist(), u.std.tolist()),
    }
    n_in, n_out = len(data["inputs"]), len(data["outputs"])
    if name == "femultigrid":
        spaces = _hierarchy_spaces(model_config["hierarchy"], path, degree=space.degree)
        _check_options(path, FEMultigrid, options)
        try:
            processor = FEMultigrid(spaces, n_in, n_out, **options)
        except TypeError as exc:
            raise ConfigError(path, f"model.options: {exc}") from None
        try:
            # Data on another mesh of the hierarchy's domain are interpolated to it.
            model = FEOperator(space, space, processor, **stats)
        except ValueError as exc:
            raise ConfigError(
                path, f"the data's mesh is not in the domain of [model.hierarchy]: {exc}"
            ) from None
        return model, train, test
    resolution = model_config["resolution"]
    grid = tuple(resolution) if isinstance(resolution, list) else (resolution,) * space.dim
    if name == "mgno":
        options.setdefault("grid", grid)
    _check_options(path, _GRID_PROCESSORS[name], options)
    try:
        # + the encoder's domain mask and coordinates
        processor = _GRID_PROCESSORS[name](n_in + 1 + space.dim, n_out, **options)
    except TypeError as exc:
        raise ConfigError(path, f"model.options: {exc}") from None
    model = FEOperator(space, space, processor, resolution=grid, **stats)
    return model, train, test


def _check_options(path: str | os.PathLike, processor: type, options: dict) -> None:
    problem = unknown_options(processor, options, name=processor.__name__)
    if problem:
        raise ConfigError(path, f"model.options: {problem}")


def _hierarchy_spaces(table: dict, path: str | os.PathLike, *, degree: int):
    """FEMultigrid's spaces, coarsest first, as ``[model.hierarchy]`` describes them:
    the ``coarser`` meshes of the domain, then a mesh and its refinements."""
    try:
        if table["mesh"] is not None:
            coarse = load_mesh(table["mesh"])
        else:
            coarse = DOMAINS[table["domain"]](table["resolution"])
        below = [DOMAINS[table["domain"]](n) for n in table["coarser"]]
    except ValueError as exc:
        raise ConfigError(path, f"model.hierarchy: {exc}") from None
    below = [FunctionSpace(mesh, degree=degree) for mesh in below]
    return below + hierarchy(coarse, table["levels"], degree=degree)


def train_from_config(
    config_path: str | os.PathLike,
    *,
    resume: bool = False,
    output: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train as ``config_path`` says; checkpoints go to ``output`` (default: its
    ``training.output``). With ``resume``, continue from ``output/last``."""
    config = read_config(config_path)
    if device is None:
        try:
            device = resolve_device(config["training"]["device"])
        except ValueError as exc:
            raise ConfigError(config_path, f"training.device: {exc}") from None
    else:
        device = resolve_device(device)
    if output is not None:
        config["training"]["output"] = str(output)
    if resume and not (Path(config["training"]["output"]) / "last").is_dir():
        raise ConfigError(config_path, f"nothing to resume: no {config['training']['output']}/last")
    # The seed fixes the initial weights too, so the same command gives the same model.
    torch.manual_seed(config["training"]["seed"])
    model, train, test = build_from_config(config, path=config_path)
    training = config["training"]
    header = read_header(config["data"]["path"])
    trainer = Trainer(
        model,
        train,
        test,
        epochs=training["epochs"],
        batch_size=training["batch_size"],
        lr=float(training["lr"]),
        weight_decay=float(training["weight_decay"]),
        grad_clip=None if training["grad_clip"] is None else float(training["grad_clip"]),
        schedule=training["schedule"],
        loss=training["loss"],
        directory=training["output"],
        resume=resume,
        device=device,
        amp=training["amp"],
        seed=training["seed"],
        progress=progress,
        extra={
            "data": {
                # the file's name, not the machine's path: checkpoints get shared
                "file": Path(config["data"]["path"]).name,
                "pde": header.get("pde"),
                "seed": header.get("seed"),
                "n_samples": header.get("n_samples"),
                "parameters": header.get("parameters"),
                "inputs": config["data"]["inputs"],
                "outputs": config["data"]["outputs"],
                "n_train": config["data"]["n_train"],
                "n_test": config["data"]["n_test"],
            }
        },
    )
    return trainer.fit()
