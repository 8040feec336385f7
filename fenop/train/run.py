"""From a training configuration to a trained checkpoint (what ``fenop train`` runs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fenop.data import FieldDataset, StoreInfo, read_store
from fenop.fem import FunctionSpace, hierarchy, load_mesh
from fenop.fem.mesh import DOMAINS
from fenop.train.config import ConfigError, read_config
from fenop.train.models import PROCESSORS, DescriptionError, ModelDescription, build_model
from fenop.train.physics import ConstraintError, PhysicsLoss, residual_for
from fenop.train.trainer import Trainer, resolve_device


def build_from_config(
    config: dict, *, path: str | os.PathLike = "<config>", store: StoreInfo | None = None
):
    """Datasets and a fresh model for a checked configuration (see :mod:`fenop.train.config`).

    The store is read once (``store``, when the caller has read it already) and its
    training and test samples checked once for NaN and Inf.

    Returns:
        ``(model, train_set, test_set)``.
    """
    data, table = config["data"], config["model"]
    fields = {"inputs": data["inputs"], "outputs": data["outputs"]}
    if store is None:
        store = read_store(data["path"], fields=data["inputs"] + data["outputs"])
    n_train, n_test = data["n_train"], data["n_test"]
    if n_train + n_test > store.n_samples:
        raise ConfigError(
            path,
            f"data.n_train + data.n_test = {n_train + n_test} exceeds the "
            f"{store.n_samples} samples of {data['path']}",
        )
    store.check_values(data["inputs"] + data["outputs"], range(n_train + n_test))
    train = FieldDataset(store, **fields, indices=range(n_train), check_values=False)
    test = FieldDataset(
        store, **fields, indices=range(n_train, n_train + n_test), check_values=False
    )
    name = table["processor"]  # a registered one (read_config checks)
    space = store.space
    input_stats, output_stats = train.normalizers()
    description = ModelDescription(
        name,
        space,
        space,
        in_channels=len(data["inputs"]),
        out_channels=len(data["outputs"]),
        options=dict(table["options"]),
        input_stats=input_stats,
        output_stats=output_stats,
    )
    if table["constraint"] is not None:
        # The residual is the store's PDE, rebuilt from its recorded parameters.
        description.constraint = {**table["constraint"], **_pde_of(store, data, path)}
    if PROCESSORS[name].mesh_native:
        description.levels = _hierarchy_spaces(table["hierarchy"], path, degree=space.degree)
    else:
        resolution = table["resolution"]
        grid = tuple(resolution) if isinstance(resolution, list) else (resolution,) * space.dim
        description.resolution = grid
    try:
        model = build_model(description)
    except ConstraintError as exc:
        raise ConfigError(path, f"model.constraint: {exc}") from None
    except DescriptionError as exc:
        raise ConfigError(path, f"model.options: {exc}") from None
    except ValueError as exc:
        if not PROCESSORS[name].mesh_native:
            raise
        # Data on another mesh of the hierarchy's domain are interpolated to it.
        raise ConfigError(
            path, f"the data's mesh is not in the domain of [model.hierarchy]: {exc}"
        ) from None
    return model, train, test


def _pde_of(store: StoreInfo, data: dict, path) -> dict:
    """The PDE a constraint or physics loss uses: the store's, with its parameters."""
    pde = store.header.get("pde")
    if pde is None:
        raise ConfigError(path, f"{store.path} names no pde: a constraint needs its residual")
    return {"pde": pde, "parameters": store.header.get("parameters", {}), "inputs": data["inputs"]}


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
    overwrite: bool = False,
) -> list[dict]:
    """Train as ``config_path`` says; checkpoints go to ``output`` (default: its
    ``training.output``). With ``resume``, continue from ``output/last``. A folder
    that holds a run already is refused unless ``resume`` or ``overwrite`` (which
    removes that run's ``best``, ``last`` and ``metrics.jsonl`` first)."""
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
    folder = Path(config["training"]["output"])
    if resume and not (folder / "last").is_dir():
        raise ConfigError(config_path, f"nothing to resume: no {folder}/last")
    run_files = [folder / name for name in ("best", "last", "metrics.jsonl")]
    if not resume and any(p.exists() for p in run_files):
        if not overwrite:
            raise ConfigError(
                config_path,
                f"{folder} holds a run already; pass --resume to continue it, or "
                "--overwrite to replace it",
            )
        for path in run_files:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    # The seed fixes the initial weights too, so the same command gives the same model.
    torch.manual_seed(config["training"]["seed"])
    data = config["data"]
    store = read_store(data["path"], fields=data["inputs"] + data["outputs"])
    model, train, test = build_from_config(config, path=config_path, store=store)
    training = config["training"]
    header = store.header
    physics = None
    if training["physics_weight"] > 0:
        pde = _pde_of(store, data, config_path)
        try:
            residual = residual_for(pde["pde"], pde["parameters"], store.space)
        except ConstraintError as exc:
            raise ConfigError(config_path, f"training.physics_weight: {exc}") from None
        physics = PhysicsLoss(residual, data["inputs"])
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
        physics=physics,
        physics_weight=float(training["physics_weight"]),
        parallel=training["parallel"],
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
