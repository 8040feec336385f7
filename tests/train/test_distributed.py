"""Training under torchrun (gloo, CPU): P processes train the weights one process
would, resume across process counts, and rank 0 alone writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fenop.data import generate
from fenop.fem import unit_square
from fenop.train.distributed import batch_share
from tests.helpers import SMALL_CONFIG, launch

WORKER = Path(__file__).with_name("distributed_run.py")


def _run(store, folder, epochs, processes, *extra):
    done = launch(WORKER, str(store), str(folder), str(epochs), *extra, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(Path(folder) / "last" / "model.safetensors")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-9, msg=key)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return generate("darcy", 23, unit_square(9), seed=0, path=folder / "d.h5", progress=False)


def test_two_and_three_processes_train_the_weights_of_one(store, tmp_path):
    one = _run(store, tmp_path / "one", 2, 1)
    _assert_same(_run(store, tmp_path / "two", 2, 2), one)
    _assert_same(_run(store, tmp_path / "three", 2, 3), one)  # unequal shares of the last
    # rank 0 alone wrote: one metrics line per epoch, no duplicates
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_femultigrid_on_two_processes_trains_the_weights_of_one(store, tmp_path):
    one = _run(store, tmp_path / "one", 2, 1, "--femultigrid")
    _assert_same(_run(store, tmp_path / "two", 2, 2, "--femultigrid"), one)


def test_fno_with_complex_weights_on_two_processes_trains_the_weights_of_one(store, tmp_path):
    one = _run(store, tmp_path / "one", 2, 1, "--fno")
    assert any(key.endswith("weight") for key in one)
    _assert_same(_run(store, tmp_path / "two", 2, 2, "--fno"), one)


def test_experts_sharded_on_two_processes_train_the_weights_of_one(store, tmp_path):
    # every process takes the whole batch and solves its share of the experts
    one = _run(store, tmp_path / "one", 2, 1, "--experts")
    _assert_same(_run(store, tmp_path / "two", 2, 2, "--experts"), one)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_stepper_by_the_pushforward_trick_on_two_processes_trains_the_weights_of_one(
    tmp_path,
):
    # the constraint per step, calls chained without gradients, noise on the inputs
    # drawn whatever the share of the batch: 4 training trajectories of 6 states, 16
    # windows of two calls' targets, batches of 6 (the last of 4 in each epoch)
    heat = generate(
        "heat",
        6,
        unit_square(9),
        seed=0,
        path=tmp_path / "h.h5",
        progress=False,
        n_steps=5,
        t_final=0.025,
        trajectory=True,
    )
    one = _run(heat, tmp_path / "one", 2, 1, "--stepper")
    _assert_same(_run(heat, tmp_path / "two", 2, 2, "--stepper"), one)


@pytest.mark.parametrize("processes", [2, 1])
def test_a_run_of_two_processes_stopped_after_a_checkpoint_resumes(store, tmp_path, processes):
    # on two processes again, or on one: the weights of the run that went straight on
    _run(store, tmp_path / "run", 2, 2, "--stop-after", "1")
    resumed = _run(store, tmp_path / "run", 2, processes, "--resume")
    _assert_same(resumed, _run(store, tmp_path / "straight", 2, 2))


def test_a_failing_rank_ends_the_run_with_its_error(store, tmp_path):
    # rank 0 waits in an all-reduce for rank 1: torchrun must end it, not hang
    args = (str(store), str(tmp_path / "run"), "2", "--fail-on-rank", "1")
    done = launch(WORKER, *args, processes=2, timeout=120)
    assert done.returncode != 0
    assert "RuntimeError: rank 1 cannot read samples" in done.stderr
    assert not (tmp_path / "run" / "last").exists()  # no checkpoint of a step not taken


def test_a_batch_that_the_processes_do_not_share_equally_is_refused(store, tmp_path):
    args = (str(store), str(tmp_path / "run"), "1", "--batch-size", "5")
    done = launch(WORKER, *args, processes=2, timeout=120)
    assert done.returncode != 0
    assert "`batch_size` 5 is not a multiple of the 2 processes" in done.stderr
    assert not (tmp_path / "run").exists()


def test_each_rank_takes_its_share_of_a_batch():
    batch = list(range(7))
    parts = [batch_share(batch, rank=r, world=3) for r in range(3)]
    assert [p for p, _ in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert sum(w for _, w in parts) == pytest.approx(3.0)  # DDP's mean is the batch's mean
    assert batch_share([8, 9], rank=2, world=3) == ([8], 0.0)


def test_fenop_train_under_torchrun(tmp_path):
    # the command itself on two processes: one run folder, written once, equal to a
    # one-process run's weights (float32 here: to float32 rounding)
    generate("darcy", 16, unit_square(9), seed=0, path=tmp_path / "d.h5", progress=False)
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(
            SMALL_CONFIG.replace('output = "run"', f'output = "{name}"')
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = [sys.executable, "-m", "fenop", "train", str(tmp_path / "one.toml")]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    ddp = [*launch, "--nproc_per_node=2", "-m", "fenop", "train", str(tmp_path / "two.toml")]
    for command in (plain, ddp):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(tmp_path / n / "last" / "model.safetensors") for n in ("one", "two"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
