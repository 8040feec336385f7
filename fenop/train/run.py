"""From a training configuration to a trained checkpoint (what ``fenop train`` runs)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from fenop._files import recover
from fenop.data import FieldDataset, StepDataset, StoreError, StoreInfo, read_store
from fenop.data.pdes import get_pde
from fenop.fem import FunctionSpace, hierarchy, load_mesh
from fenop.fem.mesh import DOMAINS
from fenop.train.config import ConfigError, read_config
from fenop.train.device import resolve_device
from fenop.train.models import PROCESSORS, DescriptionError, ModelDescription, build_model
from fenop.train.physics import ConstraintError, PhysicsLoss, residual_for
from fenop.train.stepping import calls
from fenop.train.trainer import Trainer


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
    if data["state"] is None:
        fields = {"inputs": data["inputs"], "outputs": data["outputs"]}
        train = FieldDataset(store, **fields, indices=range(n_train), check_values=False)
        test = FieldDataset(
            store, **fields, indices=range(n_train, n_train + n_test), check_values=False
        )
        in_channels, out_channels = len(data["inputs"]), len(data["outputs"])
    else:
        train, test = _steps(config, store, path)
        in_channels, out_channels = data["history"] + len(data["statics"]), data["bundle"]
    name = table["processor"]  # a registered one (read_config checks)
    space = store.space
    input_stats, output_stats = train.normalizers()
    description = ModelDescription(
        name,
        space,
        space,
        in_channels=in_channels,
        out_channels=out_channels,
        options=dict(table["options"]),
        input_stats=input_stats,
        output_stats=output_stats,
    )
    if table["constraint"] is not None:
        # The residual is the store's PDE, rebuilt from its recorded parameters.
        description.constraint = {
            **table["constraint"],
            **_pde_of(store, data, path),
            "inputs": _residual_names(store, data, path, "[model.constraint]"),
        }
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
        raise ConfigError(path, f"[model]: {exc}") from None
    except ValueError as exc:
        if not PROCESSORS[name].mesh_native:
            raise
        # Data on another mesh of the hierarchy's domain are interpolated to it.
        raise ConfigError(
            path, f"the data's mesh is not in the domain of [model.hierarchy]: {exc}"
        ) from None
    return model, train, test


def _steps(config: dict, store: StoreInfo, path) -> tuple[StepDataset, StepDataset]:
    """A stepper's training and test windows."""
    data, training = config["data"], config["training"]
    options = {
        "state": data["state"],
        "statics": data["statics"],
        "history": data["history"],
        "bundle": data["bundle"],
        "horizon": data["horizon"],
        "check_values": False,
    }
    n_train, n_test = data["n_train"], data["n_test"]
    unroll = calls(training["mode"], training["unroll"])
    try:
        train = StepDataset(store, **options, unroll=unroll, indices=range(n_train))
        test = StepDataset(store, **options, indices=range(n_train, n_train + n_test))
    except ValueError as exc:
        if isinstance(exc, StoreError):
            raise
        raise ConfigError(path, f"[data]: {exc}") from None
    return train, test


def _residual_names(store: StoreInfo, data: dict, path, key: str) -> list[str | None]:
    """The residual's name for each input channel of a constraint or physics loss
    (``key``): a map's input fields; for a stepper, none for the older states, the
    family's previous state for the last (its residual is that of one time step),
    the static fields their own. A ConfigError naming ``key`` where the family's
    residual is not that of one step."""
    if data["state"] is None:
        return data["inputs"]
    try:
        family = get_pde(_pde_of(store, data, path)["pde"])
    except ValueError as exc:
        raise ConfigError(path, f"{key}: {store.path}: {exc}") from None
    if family.previous_state is None:
        raise ConfigError(
            path,
            f"{key}: the {family.name} residual is not that of one time step, which a "
            "stepper's constraint or physics loss needs",
        )
    return [None] * (data["history"] - 1) + [family.previous_state, *data["statics"]]


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
    that holds a run already is refused unless ``resume`` or ``overwrite``.

    With ``overwrite``, everything is checked first (the data, the model, its
    constraint and physics loss); the old run is then moved aside and replaced only
    once the new run has written its first epoch. A new run that fails or is
    interrupted before that puts the old one back (and so does the next run, after
    a kill).
    """
    if resume and overwrite:
        raise ConfigError(config_path, "give either --resume or --overwrite, not both")
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
    if folder.exists() and not folder.is_dir():
        raise ConfigError(config_path, f"training.output {folder} is a file, not a folder")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the writing process
        _restore_replaced_run(folder)
    if resume and not (folder / "last").is_dir():
        raise ConfigError(config_path, f"nothing to resume: no {folder}/last")
    replace = not resume and any((folder / name).exists() for name in RUN_FILES)
    if replace and not overwrite:
        raise ConfigError(
            config_path,
            f"{folder} holds a run already; pass --resume to continue it, or "
            "--overwrite to replace it",
        )
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
        names = _residual_names(store, data, config_path, "training.physics_weight")
        try:
            residual = residual_for(
                pde["pde"],
                pde["parameters"],
                store.space,
                inputs=names,
                named="data.inputs",
            )
        except ConstraintError as exc:
            raise ConfigError(config_path, f"training.physics_weight: {exc}") from None
        physics = PhysicsLoss(residual, names)
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
        mode=training["mode"],
        unroll=training["unroll"],
        noise=float(training["noise"]),
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
                # how to roll a stepper out
                **({"stepper": train.description()} if data["state"] is not None else {}),
            }
        },
    )
    if not replace or trainer.rank != 0:
        return trainer.fit()
    with _replacing_run(folder) as replaced:
        return trainer.fit(after_save=replaced)


# What a run writes in its folder; --overwrite replaces these and nothing else there.
RUN_FILES = ("best", "last", "metrics.jsonl")
# Where an old run waits while a new one starts, and where it goes once replaced.
_ASIDE, _DISCARDED = ".replaced-run", ".discarded-run"


@contextlib.contextmanager
def _replacing_run(folder: Path):
    """Move the run in ``folder`` aside and yield a callback for the new run's first
    saved epoch, which discards the old run. If the block ends before that (an error,
    a divergence, Ctrl-C), the new run's files go and the old run comes back."""
    aside = folder / _ASIDE
    aside.mkdir()
    for name in RUN_FILES:
        if (folder / name).exists():
            os.replace(folder / name, aside / name)
    replaced = False

    def discard(epoch: int) -> None:
        nonlocal replaced
        if not replaced:
            # one rename marks the old run as replaced; removing it may then be cut short
            os.replace(aside, folder / _DISCARDED)
            shutil.rmtree(folder / _DISCARDED)
            replaced = True

    try:
        yield discard
    except BaseException as exc:
        if not replaced:
            _restore_replaced_run(folder)
            if isinstance(exc, FloatingPointError):
                raise FloatingPointError(f"{exc}; the run {folder} held is kept") from None
        raise


def _restore_replaced_run(folder: Path) -> None:
    """Put back a run that a new one (killed before its first epoch was saved) was to
    replace, removing that new run's files; remove a replaced run's leftovers, and
    what a run killed while saving a checkpoint left (:func:`fenop._files.recover`)."""
    shutil.rmtree(folder / _DISCARDED, ignore_errors=True)
    for name in ("best", "last"):
        recover(folder / name)
    aside = folder / _ASIDE
    if not aside.is_dir():
        return
    for name in RUN_FILES:
        new = folder / name
        if new.is_dir():
            shutil.rmtree(new)
        else:
            new.unlink(missing_ok=True)
        if (aside / name).exists():
            os.replace(aside / name, new)
    shutil.rmtree(aside)
