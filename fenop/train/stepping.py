"""How a stepper is trained: what one batch of trajectory windows is scored on.

A stepper (see :mod:`fenop.train.rollout`) is trained on windows of a
:class:`~fenop.data.StepDataset`: ``x`` the last ``m`` states and the static
fields, ``y`` the next states. Trained only on true states (teacher forcing), it
never sees the errors of its own predictions, which a rollout then feeds it; the
modes differ in how they show it them:

* ``"one_step"``: teacher forcing, the loss of one call from true states.
* ``"pushforward"``: ``j`` calls without gradients from the true states, then the
  loss of one call from the model's own state, ``j`` drawn from ``0 .. unroll - 1``
  for each batch (Brandstetter, Worrall & Welling, "Message passing neural PDE
  solvers", 2022): the model learns to correct the distribution of its own inputs
  at no cost of memory, and keeps learning the step from true states (``j = 0``).
* ``"unrolled"``: ``unroll`` calls with gradients through all of them, the loss
  over every predicted state (backpropagation through time; memory grows with
  ``unroll``).

``noise`` adds Gaussian noise to the input states (of standard deviation ``noise``
times the state's, from the model's input statistics), another way to make a
model robust to its own errors (Sanchez-Gonzalez et al., 2020).

>>> import torch
>>> halve = lambda x: 0.5 * x[:, -1:]
>>> x, y = torch.ones(2, 1, 4), 0.5 ** torch.arange(1, 4.0).repeat(2, 1)[..., None] * torch.ones(4)
>>> for mode in ("one_step", "pushforward", "unrolled"):
...     prediction, target = step_prediction(halve, x, y, history=1, mode=mode, unroll=3)
...     print(mode, tuple(prediction.shape), float((prediction - target).abs().max()))
one_step (2, 1, 4) 0.0
pushforward (2, 1, 4) 0.0
unrolled (2, 3, 4) 0.0
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from fenop.train.rollout import Stepper, rollout

Mode = Literal["one_step", "pushforward", "unrolled"]
MODES = typing.get_args(Mode)


def calls(mode: Mode, unroll: int) -> int:
    """Model calls whose targets a window of ``mode`` holds: 1 for teacher forcing."""
    return 1 if mode == "one_step" else unroll


def step_prediction(
    network: Stepper,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    history: int,
    mode: Mode = "one_step",
    unroll: int = 1,
    noise: torch.Tensor | None = None,
    ahead: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction of a batch of windows that the loss scores, and its target.

    Args:
        network: the stepper ``(B, m + S, n_dofs) -> (B, k, n_dofs)``.
        x: the last ``m`` states and the static fields ``(B, m + S, n_dofs)``.
        y: the next ``calls(mode, unroll) * k`` states ``(B, r k, n_dofs)``.
        history: ``m``.
        mode, unroll: see the module's docstring.
        noise: added to the input states ``(B, m, n_dofs)``, or ``None``.
        ahead: for ``"pushforward"``, the calls without gradients before the one
            trained (``j``); default ``unroll - 1``.

    Returns:
        ``(prediction, target)``, each ``(B, k, n_dofs)`` (``(B, r k, n_dofs)`` for
        ``"unrolled"``), with gradients through the calls the mode trains.
    """
    states, statics = x[:, :history], x[:, history:]
    if noise is not None:
        states = states + noise
    if mode == "one_step":
        prediction = network(torch.cat([states, statics], dim=1))
        return prediction, y[:, : prediction.shape[1]]
    if mode == "unrolled":
        prediction = rollout(network, states, y.shape[1], statics=statics, grad=True)
        return prediction, y
    if mode != "pushforward":
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    k = y.shape[1] // unroll
    ahead = unroll - 1 if ahead is None else ahead
    if not 0 <= ahead < unroll:
        raise ValueError(f"`ahead` must lie in [0, {unroll - 1}], got {ahead}")
    window = states
    if ahead > 0:
        with torch.no_grad():
            own = rollout(network, states, ahead * k, statics=statics)
        window = torch.cat([states, own], dim=1)[:, -history:]
    prediction = network(torch.cat([window, statics], dim=1))
    return prediction, y[:, ahead * k : (ahead + 1) * k]
