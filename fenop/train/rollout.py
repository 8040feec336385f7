"""Rolling a stepper out: a model that advances a state, applied to its own output.

A stepper maps the last ``m`` states and the static fields of a sample to the next
``k`` states, ``(B, m + S, n_dofs) -> (B, k, n_dofs)`` (the pairs of a
:class:`~fenop.data.StepDataset`). :func:`rollout` feeds its predictions back as
its history, step after step.

>>> import torch
>>> decay = lambda x: 0.5 * x[:, -1:]  # a "model": halve the last state
>>> rollout(decay, torch.ones(2, 1, 3), 3)[0, :, 0]
tensor([0.5000, 0.2500, 0.1250])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Stepper = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def _device_of(model: Stepper) -> torch.device | None:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return None


def rollout(
    model: Stepper,
    states: torch.Tensor,
    n_steps: int,
    *,
    statics: torch.Tensor | None = None,
    grad: bool = False,
    batch_size: int | None = None,
    after_call: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The next ``n_steps`` states of each sample, the model fed its own predictions.

    Args:
        model: a stepper ``(B, m + S, n_dofs) -> (B, k, n_dofs)``; it is called
            ``ceil(n_steps / k)`` times and left in the mode it is in (call
            ``model.eval()`` first for inference).
        states: the last ``m`` states of each sample ``(B, m, n_dofs)``, oldest first
            (e.g. a trajectory's first ``m``); ``m`` is the model's history.
        n_steps: states to predict.
        statics: the static fields of each sample ``(B, S, n_dofs)``, the same at
            every step.
        grad: keep the graph through every step (to train through an unrolled
            rollout); by default none is stored, so memory does not grow with the
            horizon.
        batch_size: samples rolled out at once (default all).
        after_call: called after each call of the model with its output
            ``(B, k, n_dofs)`` (e.g. to read a hard constraint's report of that
            call), batch after batch.

    Returns:
        ``(B, n_steps, n_dofs)`` on the device of ``states``: the predicted states,
        the first being the one after the last of ``states``.
    """
    if states.ndim != 3:
        raise ValueError(f"`states` must be (B, m, n_dofs), got shape {tuple(states.shape)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"`n_steps` must be a positive int, got {n_steps!r}")
    if statics is not None and (statics.ndim != 3 or statics.shape[::2] != states.shape[::2]):
        raise ValueError(
            f"`statics` must be (B, S, n_dofs) = ({states.shape[0]}, S, {states.shape[2]}), "
            f"got shape {tuple(statics.shape)}"
        )
    size = states.shape[0] if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if size < states.shape[0]:
        parts = [
            rollout(
                model,
                states[start : start + size],
                n_steps,
                statics=None if statics is None else statics[start : start + size],
                grad=grad,
                after_call=after_call,
            )
            for start in range(0, states.shape[0], size)
        ]
        return torch.cat(parts)
    device = _device_of(model) or states.device
    history = states.shape[1]
    window = states.to(device)
    fixed = None if statics is None else statics.to(device)
    predicted: list[torch.Tensor] = []
    done = 0
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        while done < n_steps:
            x = window if fixed is None else torch.cat([window, fixed], dim=1)
            y = model(x)
            if y.ndim != 3 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
                raise ValueError(
                    f"the model must map (B, m + S, n_dofs) to (B, k, n_dofs), got "
                    f"{tuple(x.shape)} -> {tuple(y.shape)}"
                )
            if after_call is not None:
                after_call(y)
            predicted.append(y)
            done += y.shape[1]
            window = torch.cat([window, y], dim=1)[:, -history:]
    return torch.cat(predicted, dim=1)[:, :n_steps].to(states.device)
