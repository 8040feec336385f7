"""Checkpoints written by an earlier fenop (``tests/fixtures/checkpoints``) still load
to the outputs that fenop computed for them."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fenop.train import describe_model, load_model, read_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoints"
NAMES = ["fno", "mgno", "lsm", "femultigrid", "femultigrid-not-nested"]


def test_every_processor_has_a_fixture():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_to_the_same_outputs(name):
    model = load_model(FIXTURES / name)
    io = load_file(FIXTURES / name / "io.safetensors")
    with torch.no_grad():
        y = model(io["x"])
    # The same arithmetic in the same order: equal to float32 rounding at most.
    torch.testing.assert_close(y, io["y"], rtol=1e-6, atol=1e-6)
    assert not torch.equal(io["y"], torch.zeros_like(io["y"]))


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_is_described_as_it_was_written(name):
    # The description layout is unchanged: a loaded model is written back key for key.
    written = read_config(FIXTURES / name)["model"]
    assert describe_model(load_model(FIXTURES / name)).to_json() == written
