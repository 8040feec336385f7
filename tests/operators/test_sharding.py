"""MoEConstraint's experts sharded over two processes (torchrun, gloo): the outputs,
the gradients and the report are those of one process."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fenop.operators import sharding
from tests.helpers import launch

WORKER = Path(__file__).with_name("sharding_run.py")


def _run(out: Path, processes: int, *options: str) -> dict:
    done = launch(WORKER, str(out), *options, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize(
    "options",
    [
        (),
        ("--owners",),
        ("--nonlinear",),
        ("--nonlinear", "--least-squares"),
        ("--nonlinear", "--newton"),
        ("--nonlinear", "--newton", "--least-squares"),
    ],
    ids=[
        "darcy",
        "darcy owners",
        "nonlinear galerkin",
        "nonlinear least squares",
        "nonlinear galerkin newton",
        "nonlinear least squares newton",
    ],
)
def test_experts_sharded_on_two_processes_give_the_outputs_and_gradients_of_one(tmp_path, options):
    one = _run(tmp_path / "one.safetensors", 1, *options)
    two = _run(tmp_path / "two.safetensors", 2, *options)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-12, msg=key)
    assert one["basis"].abs().max() > 0 and one["input"].abs().max() > 0  # gradients flow


def test_without_a_process_group_the_sharding_operators_are_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    y = sharding.from_shards(sharding.to_shards(x))
    assert y is x and not sharding.active()
