"""Trainer: fit an FEOperator on FieldDatasets (or a stepper on the windows of
trajectories, StepDatasets), with checkpoints and resumption.

Every epoch ends with an evaluation on the test set; metrics are appended as JSON
lines to ``metrics.jsonl``; ``last/`` is rewritten each epoch and ``best/`` when the
test error improves. ``last/`` also holds the optimiser and schedule state, so
``Trainer(..., resume=True)`` continues a killed run to the same final weights as
an uninterrupted one (the batch order of epoch e depends only on (seed, e)).

>>> import tempfile, pathlib
>>> from fenop.data import FieldDataset, generate
>>> from fenop.fem import unit_square
>>> from fenop.operators import FEOperator, MgNO
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> path = generate("darcy", 12, unit_square(9), seed=0, path=folder / "d.h5", progress=False)
>>> train, test = FieldDataset(path, indices=range(8)), FieldDataset(path, indices=range(8, 12))
>>> model = FEOperator(train.space, train.space, MgNO(4, 1, grid=(8, 8), width=4, n_layers=1),
...                    resolution=8)
>>> history = Trainer(model, train, test, epochs=2, directory=folder / "run", progress=False).fit()
>>> len(history), sorted(p.name for p in (folder / "run").iterdir())
(2, ['best', 'last', 'metrics.jsonl'])
"""

from __future__ import annotations

import json
import math
import os
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fenop._files import replacing
from fenop._options import declared_options
from fenop.data import FieldDataset
from fenop.fem import RelativeH1Loss, RelativeL2Loss
from fenop.operators import FEOperator
from fenop.operators.sharding import Shardable
from fenop.train import distributed
from fenop.train.checkpoint import CheckpointError, non_finite, read_config, save_checkpoint
from fenop.train.device import resolve_device
from fenop.train.stepping import Mode, calls, step_prediction

Schedule = Literal["cosine", "step", "constant"]
Loss = Literal["l2", "h1"]
Parallel = Literal["data", "experts"]
SCHEDULES, LOSSES, PARALLEL = (typing.get_args(c) for c in (Schedule, Loss, Parallel))


def check_settings(settings: dict, *, key: Callable[[str], str] = lambda name: f"`{name}`"):
    """Raise a ValueError naming the first of the Trainer's ``settings`` (its keyword
    arguments, or some of them) whose value is of the wrong type, not one of its
    choices or out of range; ``key`` writes an option's name in the message (a
    configuration's ``training.lr``). The one check of them, for :class:`Trainer`
    and for ``[training]`` tables alike."""
    options = declared_options(Trainer)
    for name, value in settings.items():
        options[name].check(value, key(name))
    ranges = {  # (least, whether the least is allowed)
        "epochs": (1, True),
        "batch_size": (1, True),
        "lr": (0, False),
        "weight_decay": (0, True),
        "grad_clip": (0, False),
        "physics_weight": (0, True),
        "unroll": (1, True),
        "noise": (0, True),
    }
    for name, (least, allowed) in ranges.items():
        value = settings.get(name)
        if value is None:
            continue
        if not (value >= least if allowed else value > least) or not value < math.inf:
            what = "non-negative" if least == 0 and allowed else "positive"
            raise ValueError(f"{key(name)} must be {what} and finite, got {value}")


class Trainer:
    """AdamW on an FE-norm relative loss, evaluated every epoch.

    Started by ``torchrun`` on several processes, it trains with PyTorch's
    DistributedDataParallel (:mod:`fenop.train.distributed`): each rank takes its
    share of every batch (``batch_size`` is the global batch) and of the test set,
    the weights are those one process would train, and rank 0 alone writes. With
    ``parallel="experts"`` every rank takes the whole batch instead and solves its
    share of the experts of the model's :class:`~fenop.operators.MoEConstraint`
    (:meth:`~fenop.operators.MoEConstraint.shard`), for models whose experts do not
    fit one device.

    Args:
        model: the model to train (moved to ``device``).
        train_set, test_set: datasets of ``(input, output)`` FE fields.
        epochs: number of epochs.
        batch_size: samples per step.
        lr, weight_decay: AdamW's.
        grad_clip: if given, gradients are scaled to at most this total norm before
            each step (``torch.nn.utils.clip_grad_norm_``), as ``benchmarks/darcy.py``
            trains every processor (norm 1). It tames occasional large steps; it
            does not make a too-large learning rate safe (MgNO still diverged at
            2e-3 with it).
        schedule: ``"cosine"`` (to zero over the run), ``"step"`` (halve every
            quarter of the run) or ``"constant"``.
        loss: ``"l2"`` or ``"h1"``, the relative FE norm of the error.
        directory: where checkpoints and metrics go (none are written without it).
        resume: continue from ``directory/last`` if it is there.
        device: default CUDA when present, else CPU.
        amp: mixed precision (bfloat16 autocast) on CUDA.
        seed: sets the batch order (epoch e shuffles with seed + e).
        progress: show a progress bar.
        physics: a loss ``(prediction, inputs) -> scalar`` of the PDE residual (the soft
            constraint, :class:`fenop.train.physics.PhysicsLoss`), added to the data
            loss with ``physics_weight``.
        physics_weight: its weight.
        extra: further JSON written into each checkpoint's config (e.g. data description).
        parallel: on several processes, ``"data"`` (each takes a share of every
            batch) or ``"experts"`` (each solves a share of the experts); ignored on one.
        mode, unroll, noise: for a stepper trained on a
            :class:`~fenop.data.StepDataset` (taken in windows with the targets of
            ``unroll`` calls where ``mode`` chains them): teacher forcing
            (``"one_step"``), the pushforward trick or unrolled training through
            ``unroll`` calls, and Gaussian noise on the input states of ``noise``
            times their standard deviation (:mod:`fenop.train.stepping`). The test
            error of a stepper is that of one call from true states.
    """

    def __init__(
        self,
        model: FEOperator,
        train_set: FieldDataset,
        test_set: FieldDataset,
        *,
        epochs: int,
        batch_size: int = 20,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        grad_clip: float | None = None,
        schedule: Schedule = "cosine",
        loss: Loss = "l2",
        directory: str | os.PathLike | None = None,
        resume: bool = False,
        device: str | torch.device | None = None,
        amp: bool = False,
        seed: int = 0,
        progress: bool = True,
        physics: torch.nn.Module | None = None,
        physics_weight: float = 0.0,
        extra: dict | None = None,
        parallel: Parallel = "data",
        mode: Mode = "one_step",
        unroll: int = 1,
        noise: float = 0.0,
    ):
        check_settings(
            {
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "grad_clip": grad_clip,
                "schedule": schedule,
                "loss": loss,
                "amp": amp,
                "seed": seed,
                "physics_weight": physics_weight,
                "parallel": parallel,
                "mode": mode,
                "unroll": unroll,
                "noise": noise,
            }
        )
        # A stepper's data are windows of trajectories, which know their history.
        self.history: int | None = getattr(train_set, "history", None)
        if self.history is None and (mode != "one_step" or noise > 0):
            raise ValueError(
                "`mode` and `noise` train a stepper: `train_set` must hold the windows of "
                "trajectories (a StepDataset)"
            )
        if self.history is not None and train_set.unroll != calls(mode, unroll):
            # the same trajectories, in windows with the targets of every call
            train_set = train_set.unrolled(calls(mode, unroll))
        if physics_weight > 0 and mode != "one_step":
            raise ValueError("a `physics` loss is added to one-step training only")
        self.mode, self.unroll, self.noise = mode, unroll, noise
        self.rank, self.world, self.device = distributed.setup(resolve_device(device))
        self.model = model.to(self.device)
        if self.world > 1 and parallel == "data" and batch_size % self.world:
            raise ValueError(
                f"`batch_size` {batch_size} is not a multiple of the {self.world} processes: "
                "each takes an equal share of every batch (the last of an epoch aside)"
            )
        self.sharded = self.world > 1 and parallel == "experts"
        if self.sharded:
            experts = [m for m in self.model.modules() if isinstance(m, Shardable)]
            if not experts:
                raise ValueError(
                    "`parallel='experts'` needs a model with an MoEConstraint to shard"
                )
            for constraint in experts:
                constraint.shard(self.rank, self.world)
        self.train_set, self.test_set = train_set, test_set
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.grad_clip = grad_clip
        self.directory = None if directory is None else Path(directory)
        self.amp = amp and self.device.type == "cuda"
        self.progress = progress
        space = model.space_out
        self.loss_fn = (RelativeL2Loss(space) if loss == "l2" else RelativeH1Loss(space)).to(
            self.device
        )
        self.l2_sum = RelativeL2Loss(space, reduction="sum").to(self.device)
        self.h1_sum = RelativeH1Loss(space, reduction="sum").to(self.device)
        self.optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(len(train_set) / batch_size)
        if schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimiser, T_max=steps)
        elif schedule == "step":
            step = max(1, steps // 4)
            self.scheduler = torch.optim.lr_scheduler.StepLR(
                self.optimiser, step_size=step, gamma=0.5
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimiser, lambda _: 1.0)
        self.settings = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "schedule": schedule,
            "loss": loss,
            "seed": seed,
        }
        if grad_clip is not None:  # only when given: runs saved before it still resume
            self.settings["grad_clip"] = grad_clip
        if self.history is not None:
            self.settings.update(mode=mode, unroll=unroll, noise=noise)
        if physics_weight > 0 and physics is None:
            raise ValueError(f"`physics_weight` {physics_weight} needs a `physics` loss")
        self.physics = None if physics is None else physics.to(self.device)
        self.physics_weight = physics_weight
        if physics_weight > 0:
            self.settings["physics_weight"] = physics_weight
        self.extra = extra or {}
        self.epoch, self.best = 0, math.inf
        self.saved = False  # whether directory/last holds an epoch of this run
        self.metrics: dict | None = None  # the latest epoch's, saved with last/
        if resume and self.directory is not None and (self.directory / "last").is_dir():
            self._restore(self.directory / "last")
        # Several processes (torchrun): gradients averaged over the ranks. Buffers are
        # not broadcast: they are each rank's own FE data, built alike from the mesh.
        self.network = self.model
        if self.sharded:  # every rank computes the same gradients: the same weights
            distributed.broadcast_parameters(self.model)
        elif self.world > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, broadcast_buffers=False
            )

    # -- state --------------------------------------------------------------------------

    def _save_state(self, folder: Path) -> None:
        """Optimiser and schedule state beside the weights (safetensors + JSON, no pickle)."""
        state = self.optimiser.state_dict()
        tensors, scalars = {}, {}
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, folder / "optimizer.safetensors")
        training = {
            "epoch": self.epoch,
            "best": self.best,
            "param_groups": state["param_groups"],
            "scalars": scalars,
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "settings": self.settings,
            # the epoch's line of metrics.jsonl, which is written after last/: a run
            # killed in between gets it back on resuming (_reconcile_metrics)
            "metrics": self.metrics,
        }
        (folder / "training.json").write_text(json.dumps(training))

    def _restore(self, folder: Path) -> None:
        try:
            training = json.loads((folder / "training.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                folder, f"cannot resume, no readable training.json: {exc}"
            ) from None
        if training["settings"] != self.settings:
            raise CheckpointError(
                folder,
                f"cannot resume a run made with other settings: "
                f"{training['settings']} != {self.settings}",
            )
        self.model.load_state_dict(load_file(folder / "model.safetensors"))
        tensors = load_file(folder / "optimizer.safetensors")
        state: dict[int, dict] = {}
        for key, value in {**tensors, **training["scalars"]}.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        self.optimiser.load_state_dict({"state": state, "param_groups": training["param_groups"]})
        self.scheduler.load_state_dict(training["scheduler"])
        self.epoch, self.best = training["epoch"], training["best"]
        self.metrics, self.saved = training.get("metrics"), True
        if self.rank == 0:
            self._reconcile_metrics()
            self._reconcile_best()

    def _reconcile_best(self) -> None:
        """Save ``best/`` from the restored weights where a run was killed after
        saving ``last/`` of an epoch that improved on all before it, but before
        saving ``best/``: that epoch's weights are the best."""
        if self.metrics is None or self.metrics["test_l2"] != self.best:
            return  # the last epoch was not the best: best/ holds an earlier one
        try:
            saved = read_config(self.directory / "best").get("epoch")
        except CheckpointError:
            saved = None
        if saved != self.epoch:
            save_checkpoint(
                self.directory / "best", self.model, extra=self._checkpoint_config(self.metrics)
            )

    def _reconcile_metrics(self) -> None:
        """Make ``metrics.jsonl`` hold one line for each epoch up to the restored one:
        a run killed between saving ``last/`` and appending the epoch's line lost
        that line (it is in ``last/training.json``); lines of later epochs, from a
        run killed after the line but before ``last/``, are dropped (those epochs
        are trained again)."""
        path = self.directory / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        kept: dict[int, str] = {}
        for line in lines:
            try:
                epoch = json.loads(line)["epoch"]
            except (json.JSONDecodeError, TypeError, KeyError):
                continue  # a line cut short by the kill
            if isinstance(epoch, int) and epoch <= self.epoch:
                kept.setdefault(epoch, line)
        if self.metrics is not None and self.epoch not in kept:
            kept[self.epoch] = json.dumps(self.metrics)
        wanted = [kept[e] for e in sorted(kept)]
        if wanted != lines:
            with replacing(path) as staging:
                staging.write_text("".join(line + "\n" for line in wanted))

    # -- loop ---------------------------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        """Relative L2 and H1 errors on the test set, averaged over its samples: each
        rank scores its share and the sums are added over the ranks (with sharded
        experts every rank scores every sample, as the model's solves are shared)."""
        self.model.eval()
        n = len(self.test_set)
        split = self.world > 1 and not self.sharded
        mine = distributed.share(range(n), rank=self.rank, world=self.world) if split else range(n)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for start in range(0, len(mine), self.batch_size):
                x, y = _batch(self.test_set, list(mine[start : start + self.batch_size]))
                x, y = x.to(self.device), y.to(self.device)
                prediction = self.model(x)
                totals += torch.stack([self.l2_sum(prediction, y), self.h1_sum(prediction, y)])
        self.model.train()
        if split:
            totals = distributed.sum_over_ranks(totals)
        l2, h1 = totals.tolist()
        return {"test_l2": l2 / n, "test_h1": h1 / n}

    def fit(self, *, after_save: Callable[[int], None] | None = None) -> list[dict]:
        """Train from the current epoch to ``epochs``; returns this call's metrics per epoch.

        Args:
            after_save: called with the epoch once its checkpoints and metrics line
                are written (on the process that writes).

        Raises:
            FloatingPointError: the loss, a weight or a test error became NaN or Inf;
                the message names the epoch and the last good checkpoint, which stays.
        """
        history = []
        if self.directory is not None and self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        steps_per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        bar = tqdm(
            total=self.epochs * steps_per_epoch,
            initial=self.epoch * steps_per_epoch,
            desc="training",
            unit="step",
            disable=not self.progress or self.rank != 0,
        )
        with bar:
            while self.epoch < self.epochs:
                start, running, shown = time.perf_counter(), 0.0, 0.0
                # The batch order of an epoch depends on (seed, epoch) alone, whatever the
                # number of processes (each rank takes its share of every batch). It is
                # the order DataLoader(shuffle=True) drew in earlier versions, so that
                # runs and the shipped models' recipes reproduce: its iterator takes a
                # base seed from the generator before the sampler's permutation.
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                torch.empty((), dtype=torch.int64).random_(generator=generator)
                order = torch.randperm(len(self.train_set), generator=generator).tolist()
                for step in range(steps_per_epoch):
                    batch = order[step * self.batch_size : (step + 1) * self.batch_size]
                    if self.sharded:  # every rank the whole batch, its share of the experts
                        mine, weight = batch, 1.0
                    else:
                        mine, weight = distributed.batch_share(
                            batch, rank=self.rank, world=self.world
                        )
                    x, y = _batch(self.train_set, mine)
                    x, y = x.to(self.device), y.to(self.device)
                    self.optimiser.zero_grad(set_to_none=True)
                    # bfloat16 needs no loss scaling; FEOperator keeps its FE maps and
                    # output in float32, so only the processor runs in low precision.
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        if self.history is None:
                            prediction, target = self.network(x), y
                        else:  # a stepper, as its training mode calls it
                            prediction, target = step_prediction(
                                self.network,
                                x,
                                y,
                                history=self.history,
                                mode=self.mode,
                                unroll=self.unroll,
                                noise=self._noise(batch, mine, x),
                                ahead=self._ahead(batch),
                            )
                    loss = self.loss_fn(prediction, target)
                    if self.physics_weight > 0:
                        loss = loss + self.physics_weight * self.physics(prediction, x)
                    own = loss.item()  # this rank's mean, read once for the check, metrics, bar
                    finite = math.isfinite(own)
                    if self.world > 1:  # every rank stops, not one alone (the rest would wait)
                        flag = torch.tensor(float(finite), dtype=torch.float64, device=self.device)
                        finite = distributed.sum_over_ranks(flag).item() == self.world
                    if not finite:
                        value = own if not math.isfinite(own) else "NaN on another process"
                        self._diverged(f"the loss is {value} at step {step + 1} of")
                    if self.world > 1:  # DDP averages: the ranks' weighted means sum
                        loss = loss * weight
                    loss.backward()
                    if self.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                    self.optimiser.step()
                    self.scheduler.step()
                    running += own * weight / self.world  # summed over the ranks below
                    shown += own
                    bar.update(1)
                    bar.set_postfix(loss=f"{shown / (step + 1):.4f}")
                count, names = non_finite(self.model.named_parameters())
                if count:
                    self._diverged(f"the weights {names} are not finite after")
                errors = self._evaluate()
                if not math.isfinite(errors["test_l2"] + errors["test_h1"]):
                    self._diverged(f"the test error is {errors['test_l2']} after")
                self.epoch += 1
                metrics = {
                    "epoch": self.epoch,
                    "train_loss": distributed.sum_over_ranks(
                        torch.tensor(running, dtype=torch.float64, device=self.device)
                    ).item()
                    / steps_per_epoch,
                    **errors,
                    "lr": self.scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - start,
                }
                history.append(metrics)
                self._write(metrics)
                if after_save is not None and self.directory is not None and self.rank == 0:
                    after_save(self.epoch)
        return history

    def _generator(self, batch: list[int], offset: int = 0) -> torch.Generator:
        """A generator seeded by (seed, epoch, the batch's first item, ``offset``):
        the same draws on every process, whatever its share of the batch."""
        return torch.Generator().manual_seed(
            (self.seed * 100_003 + self.epoch) * 1_000_003 + batch[0] + offset
        )

    def _ahead(self, batch: list[int]) -> int | None:
        """The pushforward trick's calls without gradients for this batch, drawn from
        0 .. unroll - 1, alike on every process."""
        if self.mode != "pushforward":
            return None
        return int(torch.randint(self.unroll, (), generator=self._generator(batch, 7)))

    def _noise(self, batch: list[int], mine: list[int], x: torch.Tensor) -> torch.Tensor | None:
        """Noise on the input states of this rank's share ``mine`` of ``batch``
        ``(len(mine), m, n_dofs)``, or ``None``: drawn for the whole batch, so that it
        does not depend on the processes."""
        if self.noise == 0:
            return None
        generator = self._generator(batch)
        draw = torch.randn((len(batch), self.history, x.shape[-1]), generator=generator)
        position = {item: i for i, item in enumerate(batch)}
        draw = draw[[position[item] for item in mine]].to(x)
        stats = getattr(self.model, "input_stats", None)
        scale = 1.0 if stats is None else stats.std[: self.history, None].to(x)
        return self.noise * scale * draw

    def _diverged(self, what: str) -> None:
        """Raise the FloatingPointError of a diverged run: ``what`` happened in the
        current epoch; where the last good checkpoint is, if this run wrote one."""
        message = f"training diverged: {what} epoch {self.epoch + 1}"
        if self.directory is not None and self.saved:
            message += (
                f"; the last good checkpoint is {self.directory / 'last'} (epoch {self.epoch})"
            )
        elif self.directory is not None:
            message += "; no checkpoint was written"
        raise FloatingPointError(message + " (a lower learning rate may help)")

    def _checkpoint_config(self, metrics: dict) -> dict:
        """What a checkpoint of the current epoch records beside the model."""
        return {
            **self.extra,
            "training": self.settings,
            "epoch": self.epoch,
            "test_error": metrics["test_l2"],
        }

    def _write(self, metrics: dict) -> None:
        """Save the epoch: ``last/`` (weights, optimiser state and the epoch's metrics,
        which appear together), then ``best/`` if the epoch improved, then the line
        of ``metrics.jsonl``. A run killed between any two resumes whole: the line and
        ``best/`` are made good from ``last/`` (:meth:`_reconcile_metrics`,
        :meth:`_reconcile_best`)."""
        if self.directory is None or self.rank != 0:
            return
        extra = self._checkpoint_config(metrics)
        self.metrics = metrics
        improved = metrics["test_l2"] < self.best
        if improved:
            self.best = metrics["test_l2"]
        save_checkpoint(self.directory / "last", self.model, extra=extra, attach=self._save_state)
        self.saved = True
        if improved:
            save_checkpoint(self.directory / "best", self.model, extra=extra)
        self._append_metrics(metrics)

    def _append_metrics(self, metrics: dict) -> None:
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def saved_epoch(directory: str | os.PathLike) -> int | None:
    """The epoch a training run's folder has saved to resume from (its ``last/``),
    or ``None`` where it has none (or none that reads)."""
    try:
        epoch = json.loads((Path(directory) / "last" / "training.json").read_text())["epoch"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return epoch if isinstance(epoch, int) else None


def _batch(dataset, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples ``items`` of ``dataset`` stacked, ``(b, C, n)`` each (read at once
    where the dataset can)."""
    read = getattr(dataset, "__getitems__", None)
    samples = read(items) if read is not None else [dataset[i] for i in items]
    x, y = zip(*samples, strict=True)
    return torch.stack(x), torch.stack(y)
