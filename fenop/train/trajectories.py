"""Running a stepper over a trajectory store: its errors at every horizon, and its
rollouts written into a new store. What ``fenop evaluate`` and ``fenop predict`` do
for a model that advances a state (:mod:`fenop.train.stepping`).

A stepper's checkpoint records how to roll it out (``data.stepper`` of its
``config.json``: the state field, the static fields, its history and time step).
Its error is measured two ways at each step of the store's trajectories:
*free-running*, fed its own predictions from the first ``history`` true states (what
a user of the model gets), and *teacher-forced*, each step from the true states
before it (the one-step error it was trained on).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fenop._errors import InputError
from fenop._files import replacing
from fenop.data import StoreError, read_store
from fenop.data.header import open_h5
from fenop.data.store import create_store, sample_range, write_samples
from fenop.fem import FunctionSpace, RelativeH1Loss, RelativeL2Loss
from fenop.train.checkpoint import checkpoint_path, read_config
from fenop.train.device import resolve_device
from fenop.train.inference import (
    ModelLike,
    _converged,
    _numpy_dtype,
    checked_output,
    model_on_store,
    prediction_attrs,
)
from fenop.train.rollout import rollout

# The relative L2 error above which a rollout counts as no longer accurate, for
# the horizon a summary reports (the and the literature's 10 %).
ACCURATE = 0.1


def stepper_of(model: ModelLike) -> dict | None:
    """How a checkpoint's stepper rolls out (its ``data.stepper``: ``state``,
    ``statics``, ``history``, ``bundle``, ``horizon``, ``dt``), or ``None`` for a
    model that maps fields to fields, or a model object (which records none)."""
    if not isinstance(model, str | os.PathLike):
        return None
    return read_config(checkpoint_path(model)).get("data", {}).get("stepper")


@dataclasses.dataclass
class RolloutEvaluation:
    """A stepper's errors over a store's trajectories.

    Attributes:
        path: the store.
        samples: ``(n,)`` the trajectories scored.
        times: ``(T,)`` the times of the states predicted (the store's, after the
            first ``history``).
        free_l2, free_h1: ``(n, T)`` relative errors of the free-running rollout at
            each time.
        forced_l2: ``(n, T)`` relative L2 error of one step from the true states.
        shown: the first sample's ``(reference, prediction)`` states ``(T, n_dofs)``,
            free-running, for pictures and animations.
        space: the store's FE space.
        failed: ``(m,)`` the trajectories of which a hard-constraint solve failed at
            some step, free-running or teacher-forced (empty without a constraint).
    """

    path: str
    samples: np.ndarray
    times: np.ndarray
    free_l2: np.ndarray
    free_h1: np.ndarray
    forced_l2: np.ndarray
    shown: tuple[np.ndarray, np.ndarray]
    space: FunctionSpace
    failed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def horizon(self) -> int | None:
        """Steps until the mean free-running L2 error first exceeds 10 %, or ``None``
        where it never does within the trajectories. A rollout that diverged (a NaN
        or infinite error) has exceeded it."""
        above = np.nonzero(~(self.free_l2.mean(axis=0) <= ACCURATE))[0]
        return int(above[0]) if len(above) else None

    def summary(self, horizons=(1, 10)) -> list[str]:
        """Lines of the mean errors after ``horizons`` steps and at the end of the
        trajectories, free-running and teacher-forced, and the 10 % horizon."""
        steps = len(self.times)
        lines = [
            f"{len(self.samples)} trajectories of {self.path}: {steps} steps predicted "
            f"from t = {self.times[0]:g} to {self.times[-1]:g}"
        ]
        for h in sorted({*(h for h in horizons if h <= steps), steps}):
            free, forced = self.free_l2[:, h - 1], self.forced_l2[:, h - 1]
            h1 = self.free_h1[:, h - 1].mean()
            lines.append(
                f"after {h:>4} step{'s' if h > 1 else ' '}: relative L2 free-running mean "
                f"{free.mean():.4f} (max {free.max():.4f}), H1 {h1:.4f}; "
                f"teacher-forced {forced.mean():.4f}"
            )
        diverged = ~np.isfinite(self.free_l2)
        if diverged.any():
            first = int(np.nonzero(diverged.any(axis=0))[0][0]) + 1
            lines.append(
                f"{_count(int(diverged.any(axis=1).sum()), 'rollout')} diverged (a NaN or "
                f"infinite error), the first after {_count(first, 'step')}"
            )
        if len(self.failed):
            lines.append(
                "the hard constraint's solve failed at some step of "
                f"{_count(len(self.failed), 'trajectory', 'trajectories')}"
            )
        reach = self.horizon()
        lines.append(
            f"mean over the trajectories: free-running {self.free_l2.mean():.4f}, teacher-forced "
            f"{self.forced_l2.mean():.4f}; "
            + (
                f"the free-running error first exceeds 10 % after {reach + 1} steps"
                if reach is not None
                else f"the free-running error stays below 10 % for all {steps} steps"
            )
        )
        return lines


def _count(n: int, one: str, many: str | None = None) -> str:
    """``n`` things, in the singular or plural."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _stepper_store(model: ModelLike, path, *, need_trajectory: bool, stepper: dict | None):
    if stepper is None:
        stepper = stepper_of(model)
    if stepper is None:
        raise InputError(
            f"{model}: not a stepper (its checkpoint records no data.stepper)"
            if isinstance(model, str | os.PathLike)
            else "a model object records no rollout: give `stepper`"
        )
    stepper = {"statics": [], "history": 1, **stepper}
    state, statics = stepper["state"], list(stepper["statics"])
    store = read_store(path, fields=[state, *statics])
    moving = state in store.trajectories
    if need_trajectory and not moving:
        raise StoreError(path, f"field {state!r} is not a trajectory (sample, time, dof)")
    history = stepper["history"]
    if moving and len(store.times) < history + (1 if need_trajectory else 0):
        raise StoreError(
            path,
            f"its trajectories of {len(store.times)} states are too short for the model's "
            f"history of {history}" + (" and a step to compare" if need_trajectory else ""),
        )
    if not moving and history > 1:
        raise StoreError(
            path,
            f"field {state!r} holds one state per sample; the model needs its last {history}: "
            "store them as a trajectory (sample, time, dof)",
        )
    for name in statics:
        if name in store.trajectories:
            raise StoreError(path, f"field {name!r} is a trajectory; the model takes it static")
    return stepper, store


def _torch_dtype(net) -> torch.dtype:
    """What to read a store's fields as for ``net``: its dtype (float32 by default)."""
    return torch.float64 if _numpy_dtype(net) == np.float64 else torch.float32


def _statics(f, statics: list[str], rows, device, dtype) -> torch.Tensor | None:
    """The static fields of the samples ``rows`` from the open store ``f``,
    ``(len(rows), S, n_dofs)``, or ``None`` without any."""
    if not statics:
        return None
    values = np.stack([[f[name][int(r)] for name in statics] for r in rows])
    return torch.from_numpy(values).to(device, dtype)


def evaluate_rollouts(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    samples: slice | None = None,
    batch_size: int = 32,
    device=None,
    progress: bool = False,
    stepper: dict | None = None,
) -> RolloutEvaluation:
    """Score a stepper on the trajectories of the store at ``path``: rolled out from
    the first ``history`` states of each to its end, and one step at a time.

    Args:
        model: a stepper's checkpoint (shipped name or directory), or an
            :class:`~fenop.operators.FEOperator` with ``stepper``.
        path: a store with the stepper's state as a trajectory, and its static fields.
        samples: the trajectories scored, as a slice of the store's (default all).
        batch_size: trajectories rolled out at once.
        device: default CUDA when present.
        progress: show a progress bar.
        stepper: for a model object, how it rolls out: ``{"state": "u",
            "statics": [...], "history": m}`` (a checkpoint records it).

    Raises:
        StoreError, CheckpointError, InputError: the store or checkpoint cannot be used.
    """
    if batch_size < 1:
        raise InputError(f"`batch_size` must be positive, got {batch_size}")
    stepper, store = _stepper_store(model, path, need_trajectory=True, stepper=stepper)
    state, statics, history = stepper["state"], stepper["statics"], stepper["history"]
    rows = np.arange(store.n_samples)[sample_range(samples, store.n_samples, path)]
    store.check_values([state, *statics], rows)
    device = resolve_device(device)
    net = model_on_store(model, store, device=device)
    dtype = _torch_dtype(net)
    l2 = RelativeL2Loss(store.space, reduction="none").to(device)
    h1 = RelativeH1Loss(store.space, reduction="none").to(device)
    free_l2, free_h1, forced_l2, shown, failed = [], [], [], None, []
    with (
        open_h5(store.path, "r") as f,
        torch.no_grad(),
        tqdm(total=len(rows), unit="trajectory", disable=not progress) as bar,
    ):
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            states = torch.from_numpy(np.stack([f[state][int(r)] for r in part])).to(device, dtype)
            fixed = _statics(f, statics, part, device, dtype)
            truth = states[:, history:]
            solved = []  # per call of the model: its constraint's solves succeeded, (B,)
            predicted = rollout(
                net,
                states[:, :history],
                truth.shape[1],
                statics=fixed,
                after_call=lambda _: solved.append(_converged(net, len(part))),  # noqa: B023
            )
            forced = []
            for t in range(history, states.shape[1]):
                x = states[:, t - history : t]
                x = x if fixed is None else torch.cat([x, fixed], dim=1)
                forced.append(net(x)[:, :1])
                solved.append(_converged(net, len(part)))
            forced = torch.cat(forced, dim=1)
            failed.extend(part[~np.all(solved, axis=0)].tolist())
            flat = lambda z: z.reshape(-1, 1, z.shape[-1])  # noqa: E731 (B T, 1, n)
            shape = truth.shape[:2]
            free_l2.append(l2(flat(predicted), flat(truth)).reshape(shape).cpu().numpy())
            free_h1.append(h1(flat(predicted), flat(truth)).reshape(shape).cpu().numpy())
            forced_l2.append(l2(flat(forced), flat(truth)).reshape(shape).cpu().numpy())
            if shown is None:
                shown = (truth[0].double().cpu().numpy(), predicted[0].double().cpu().numpy())
            bar.update(len(part))
    return RolloutEvaluation(
        os.fspath(path),
        rows,
        store.times[history:],
        np.concatenate(free_l2),
        np.concatenate(free_h1),
        np.concatenate(forced_l2),
        shown,
        store.space,
        np.asarray(failed, dtype=np.int64),
    )


def predict_rollouts(
    model: ModelLike,
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    steps: int | None = None,
    batch_size: int = 32,
    device=None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Roll a stepper out from the initial states of the store at ``path`` and write
    the trajectories to ``output`` (atomically).

    The initial states are the first ``history`` states of the stepper's state
    field, a trajectory, or, for a history of one, that field as a static
    ``(sample, dof)`` field (one initial state per sample, e.g. of a user's own).
    The output holds the state as a trajectory of the initial states and ``steps``
    predicted ones, at the times of the input (or from 0) spaced by the model's step.

    Args:
        model: a stepper's checkpoint (shipped name or directory).
        path: the store of initial states and static fields (any mesh of the domain).
        output: the trajectory store to write.
        steps: states to predict (default: the horizon the model was trained on).
        batch_size, device, overwrite, progress: as :func:`~fenop.train.predict_store`.
    """
    output = checked_output(output, path, overwrite=overwrite, batch_size=batch_size)
    stepper, store = _stepper_store(model, path, need_trajectory=False, stepper=None)
    state, statics, history = stepper["state"], stepper["statics"], stepper["history"]
    steps = stepper["horizon"] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"`steps` must be a positive int, got {steps!r}")
    if stepper.get("dt") is None:
        raise InputError(f"{model}: its training data had no even time step to predict with")
    store.check_values([state, *statics])
    device = resolve_device(device)
    net = model_on_store(model, store, device=device)
    dtype = _torch_dtype(net)
    moving = state in store.trajectories
    t0 = store.times[history - 1] if moving else 0.0
    times = t0 + stepper["dt"] * np.arange(-(history - 1), steps + 1)
    name = model if not isinstance(model, str | os.PathLike) else os.fspath(model)
    attrs = prediction_attrs(store, name, path, net.space_out)
    n = store.n_complete
    with replacing(output) as staging:
        create_store(
            staging,
            store.space,
            fields=[state],
            n_samples=n,
            attrs=attrs,
            times=times,
            trajectories=[state],
        )
        with (
            open_h5(store.path, "r") as f,
            torch.no_grad(),
            tqdm(total=n, unit="trajectory", disable=not progress) as bar,
        ):
            for start in range(0, n, batch_size):
                part = range(start, min(start + batch_size, n))
                first = np.stack(
                    [f[state][r, :history] if moving else f[state][r][None] for r in part]
                )
                fixed = _statics(f, statics, part, device, dtype)
                initial = torch.from_numpy(first).to(device, dtype)
                predicted = rollout(net, initial, steps, statics=fixed).double().cpu().numpy()
                bad = ~np.isfinite(predicted).all(axis=(1, 2))
                if bad.any():
                    raise InputError(
                        f"{name}: its rollout of sample {start + int(np.argmax(bad))} of {path} "
                        f"holds NaN or Inf; {output} not written"
                    )
                write_samples(staging, start, {state: np.concatenate([first, predicted], axis=1)})
                bar.update(len(part))
    return output
