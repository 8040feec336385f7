"""Running a model over a store: its errors against the store's outputs, or its
predictions written into a new store. What ``fenop evaluate`` and ``fenop predict`` do.

The model may be an :class:`~fenop.operators.FEOperator` or a checkpoint (a shipped
name or a directory, whose ``config.json`` names the input and output fields). A
store on another mesh of the model's domain is fine: the model is moved to it
(:meth:`~fenop.operators.FEOperator.transfer`). Batches are read in the model's
dtype.

>>> import tempfile, pathlib
>>> from fenop.data import generate
>>> from fenop.fem import unit_square
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> path = generate("darcy", 4, unit_square(17), seed=0, path=folder / "d.h5", progress=False)
>>> evaluation = evaluate_store("darcy-fno", path)
>>> len(evaluation.l2), bool(evaluation.l2.mean() < 0.1)
(4, True)
>>> predict_store("darcy-fno", path, folder / "p.h5", progress=False).name
'p.h5'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fenop._checks import missing_folder
from fenop._errors import InputError
from fenop._files import replacing
from fenop.data import StoreError, StoreInfo, read_store
from fenop.data.header import open_h5
from fenop.data.store import (
    create_store,
    dirichlet_label,
    read_batches,
    sample_range,
    write_samples,
)
from fenop.fem import FunctionSpace, RelativeH1Loss, RelativeL2Loss
from fenop.operators import FEOperator
from fenop.train.checkpoint import checkpoint_path, load_checkpoint, read_config
from fenop.train.device import resolve_device
from fenop.train.physics import ConstraintError, build_constraint, residual_for, residual_inputs

ModelLike = FEOperator | str | os.PathLike


@dataclasses.dataclass
class Evaluation:
    """A model's errors on a store's samples.

    Attributes:
        path: the store.
        samples: ``(n,)`` indices of the samples scored.
        l2, h1: ``(n,)`` relative L2 and H1 errors of each (FE norms on the store's mesh).
        shown: the first few samples' ``(inputs, reference, prediction)``, each
            ``(k, n_dofs)`` (first channel), for pictures.
        failed: ``(m,)`` indices of samples whose hard-constraint solve failed
            (empty without a constraint).
        space: the store's FE space, where the errors were measured.
    """

    path: str
    samples: np.ndarray
    l2: np.ndarray
    h1: np.ndarray
    shown: tuple[np.ndarray, np.ndarray, np.ndarray]
    failed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    space: FunctionSpace | None = None

    def summary(self) -> list[str]:
        """One line per norm: mean, median and max over the samples (and one for
        failed constraint solves, if any)."""
        lines = [
            f"{name}: mean {e.mean():.4f}, median {np.median(e):.4f}, max {e.max():.4f} "
            f"over {len(e)} samples of {self.path}"
            for name, e in (("relative L2", self.l2), ("relative H1", self.h1))
        ]
        if len(self.failed):
            lines.append(f"the hard constraint's solve failed for {len(self.failed)} samples")
        return lines


def fields_of(model: ModelLike) -> tuple[list[str], list[str]]:
    """The input and output field names a model was trained on (its checkpoint's data
    description), or ``a`` and ``u`` for a model without one."""
    if isinstance(model, FEOperator):
        return ["a"], ["u"]
    described = read_config(checkpoint_path(model)).get("data", {})
    return list(described.get("inputs", ["a"])), list(described.get("outputs", ["u"]))


def model_on_store(model: ModelLike, store: StoreInfo, *, device=None) -> FEOperator:
    """``model`` (loaded if a checkpoint) on ``store``'s mesh and ``device``, in
    evaluation mode. A StoreError says when the mesh is not in the model's domain."""
    device = resolve_device(device)
    if not isinstance(model, FEOperator):
        model = load_checkpoint(checkpoint_path(model), device=device)
    model = model.to(device).eval()
    _check_same_pde(model, store)
    if store.space.same_dofs(model.space_in):
        return model
    # The boundary condition is the model's: a user's mesh file says nothing of it (a
    # converted one is labelled with Dirichlet DOFs), and a no-flux model has none.
    dirichlet = "boundary" if len(model.space_out.boundary_dofs) else None
    space = FunctionSpace(store.space.mesh, degree=store.space.degree, dirichlet=dirichlet)
    constraint = None
    if model.constraint is not None:
        # The constraint's residual and experts, rebuilt on this mesh by the same rules.
        description = getattr(model.constraint, "description", None)
        if description is None:
            raise InputError("a constraint made by hand cannot be moved to another mesh")
        constraint = build_constraint(description, space)
    try:
        return model.transfer(space, constraint=constraint)
    except ValueError as exc:
        raise StoreError(store.path, f"this mesh is not in the model's domain: {exc}") from None


def _check_same_pde(model: FEOperator, store: StoreInfo) -> None:
    """A hard-constrained model makes its output satisfy its own discrete PDE: on a
    store that records another PDE, or parameters that give another residual (another
    load), its predictions would solve the wrong problem. Parameters that only shape
    the data (the random inputs' law) are fine; a store that records no PDE (a
    user's own) is taken as the model's."""
    description = getattr(model.constraint, "description", None)
    if description is None or "pde" not in store.header:
        return
    pde, theirs = description["pde"], store.header["pde"]
    if theirs != pde:
        raise StoreError(
            store.path,
            f"holds {theirs} data, but the model's hard constraint solves the {pde} problem",
        )
    ours, recorded = description.get("parameters") or {}, store.header.get("parameters")
    if recorded is None or recorded == ours:
        return
    try:
        residuals = [residual_for(pde, p, store.space) for p in (ours, recorded)]
    except ConstraintError as exc:
        raise StoreError(store.path, f"its {pde} parameters: {exc}") from None
    if not _same_residual(*residuals):
        differ = sorted(k for k in set(ours) | set(recorded) if ours.get(k) != recorded.get(k))
        raise StoreError(
            store.path,
            f"its {pde} parameters ({', '.join(differ)}) give another residual than the one "
            "the model's hard constraint solves",
        )


def _same_residual(first, second) -> bool:
    """Whether two residual modules agree at a random field and random positive inputs
    (one evaluation: residuals of the same family differ in their parameters only)."""
    generator = torch.Generator().manual_seed(0)
    n = first.forms.space.n_dofs
    u = torch.randn(1, n, generator=generator, dtype=torch.float64)
    inputs = {
        name: 1 + torch.rand(1, n, generator=generator, dtype=torch.float64)
        for name in residual_inputs(first)
    }
    with torch.no_grad():
        a, b = first(u, **inputs), second(u, **inputs)
    return bool((a - b).norm() <= 1e-12 * a.norm().clamp_min(1e-300))


def _numpy_dtype(model: FEOperator):
    """What to read a store's fields as: the model's dtype."""
    return np.float64 if model.dtype == torch.float64 else np.float32


def evaluate_store(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    samples: slice | None = None,
    batch_size: int = 32,
    device=None,
    show: int = 3,
    progress: bool = False,
) -> Evaluation:
    """Score ``model`` on the samples of the store at ``path``.

    Args:
        model: an FEOperator or a checkpoint (shipped name or directory).
        path: a store holding the model's input and output fields.
        inputs, outputs: field names (default: the checkpoint's, else ``a``, ``u``).
        samples: the samples scored, as a slice of the store's (default all).
        batch_size: samples per forward pass.
        device: default CUDA when present.
        show: how many of the first samples to keep for :attr:`Evaluation.shown`.
        progress: show a progress bar.

    Raises:
        StoreError, CheckpointError: the store or the checkpoint cannot be used.
    """
    default_in, default_out = fields_of(model)
    inputs, outputs = list(inputs or default_in), list(outputs or default_out)
    if batch_size < 1:
        raise InputError(f"`batch_size` must be positive, got {batch_size}")
    device = resolve_device(device)
    store = read_store(path, fields=inputs + outputs)
    rows = np.arange(store.n_samples)[sample_range(samples, store.n_samples, path)]
    store.check_values(inputs + outputs, rows)
    model = model_on_store(model, store, device=device)
    l2 = RelativeL2Loss(store.space, reduction="none").to(device)
    h1 = RelativeH1Loss(store.space, reduction="none").to(device)
    errors_l2, errors_h1, shown, failed = [], [], [], []
    dtype = _numpy_dtype(model)
    with torch.no_grad(), tqdm(total=len(rows), unit="sample", disable=not progress) as bar:
        # only the span of the rows scored is read
        span = {"first": int(rows.min()), "stop": int(rows.max()) + 1}
        for start, fields in read_batches(store, inputs + outputs, batch_size, dtype=dtype, **span):
            keep = (rows >= start) & (rows < start + len(fields))
            if not keep.any():
                continue
            fields = torch.from_numpy(fields[rows[keep] - start]).to(device)
            x, y = fields[:, : len(inputs)], fields[:, len(inputs) :]
            prediction = model(x)
            failed.extend(rows[keep][~_converged(model, len(x))].tolist())
            errors_l2.append(l2(prediction, y).cpu().numpy())
            errors_h1.append(h1(prediction, y).cpu().numpy())
            if sum(len(s[0]) for s in shown) < show:
                shown.append([t[:, 0].cpu().numpy() for t in (x, y, prediction)])
            bar.update(len(x))
    kept = tuple(np.concatenate([s[k] for s in shown])[:show] for k in range(3))
    return Evaluation(
        os.fspath(path),
        rows,
        np.concatenate(errors_l2),
        np.concatenate(errors_h1),
        kept,
        np.asarray(failed, dtype=np.int64),
        store.space,
    )


def _converged(model: FEOperator, batch: int) -> np.ndarray:
    """``(batch,)`` whether the last call's constraint solves succeeded (all, without one)."""
    if model.constraint is None:
        return np.ones(batch, dtype=bool)
    return model.constraint.report["converged"].numpy()


def checked_output(
    output: str | os.PathLike, source: str | os.PathLike, *, overwrite: bool, batch_size: int
) -> Path:
    """``output`` as a Path, or an InputError where predictions cannot be written
    there: a folder, an existing file (without ``overwrite``), the input store
    ``source`` itself, a missing folder; or a ``batch_size`` below one."""
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output}: is a folder; name a file to write")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists; pass --overwrite to replace it")
    if output.exists() and output.resolve() == Path(source).resolve():
        raise InputError(f"{output}: is the input store; write the predictions elsewhere")
    if problem := missing_folder(output):
        raise InputError(f"{output}: {problem}")
    if batch_size < 1:
        raise InputError(f"`batch_size` must be positive, got {batch_size}")
    return output


def prediction_attrs(
    store: StoreInfo, model_name, source: str | os.PathLike, space: FunctionSpace
) -> dict:
    """The root attributes of a store of predictions: the input's PDE, the boundary
    condition of the model's output ``space``, which model made them, with which
    fenop, from which file."""
    from fenop import __version__

    return {
        **({"pde": store.header["pde"]} if "pde" in store.header else {}),
        "dirichlet": dirichlet_label(space),
        "model": str(model_name),
        "fenop_version": __version__,
        "source": os.fspath(source),
    }


def predict_store(
    model: ModelLike,
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    batch_size: int = 32,
    device=None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run ``model`` on every sample of the store at ``path``; write a store of its
    predictions at ``output`` (atomically: it appears complete, or not at all).

    Args:
        model: an FEOperator or a checkpoint (shipped name or directory).
        path: a store holding the model's input fields (any mesh of its domain).
        output: the store to write, on the input's mesh, fields named ``outputs``.
        inputs, outputs: field names (default: the checkpoint's, else ``a``, ``u``).
        batch_size: samples per forward pass.
        device: default CUDA when present.
        overwrite: replace an existing ``output``.
        progress: show a progress bar.

    Raises:
        StoreError, CheckpointError: the input or the checkpoint cannot be used;
        InputError: ``output`` exists (without ``overwrite``), is the input, or
            cannot be written.
    """
    output = checked_output(output, path, overwrite=overwrite, batch_size=batch_size)
    device = resolve_device(device)
    default_in, default_out = fields_of(model)
    inputs, outputs = list(inputs or default_in), list(outputs or default_out)
    store = read_store(path, fields=inputs)
    store.check_values(inputs)
    name = model if not isinstance(model, FEOperator) else type(model.processor).__name__
    model = model_on_store(model, store, device=device)
    attrs = prediction_attrs(store, name, path, model.space_out)
    n = store.n_complete
    with replacing(output) as staging:
        create_store(staging, store.space, fields=outputs, n_samples=n, attrs=attrs)
        batches = read_batches(store, inputs, batch_size, dtype=_numpy_dtype(model))
        failed = 0
        with torch.no_grad(), tqdm(total=n, unit="sample", disable=not progress) as bar:
            for start, x in batches:
                y = model(torch.from_numpy(x).to(device)).double().cpu().numpy()
                if not np.isfinite(y).all():
                    first = start + int(np.nonzero(~np.isfinite(y).all(axis=(1, 2)))[0][0])
                    raise InputError(
                        f"{name}: its prediction for sample {first} of {path} holds NaN or "
                        f"Inf (an input outside what it was trained on?); {output} not written"
                    )
                failed += int((~_converged(model, len(x))).sum())
                write_samples(staging, start, {f: y[:, k] for k, f in enumerate(outputs)})
                bar.update(len(x))
        if model.constraint is not None:
            with open_h5(staging, "r+") as f:  # read by `fenop predict` to say so
                f.attrs["constraint_failed"] = failed
    return output
