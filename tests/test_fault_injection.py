"""Fault injection: ``fenop generate``, ``train``, ``predict`` and ``convert`` killed at
random points (SIGINT, SIGTERM, SIGKILL) and run again.

After each kill the inputs are unchanged and no partial output is left that the
next run does not remove; after the next run (the same command, ``--resume`` for a
training run with a saved epoch) the outputs equal those of an uninterrupted run,
and nothing else is left beside them. The default run kills each command once; the
long run (``-m slow``) with each signal at several seeded times.
"""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import SMALL_CONFIG, sigint_by_default

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
# What an interrupted command exits with: 128 + the signal (SIGKILL: killed, -9).
STATUS = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}

# The tests' small MgNO, trained long enough to be killed mid-run.
CONFIG = SMALL_CONFIG.replace('"d.h5"', '"data.h5"').replace("n_train = 12", "n_train = 20")
CONFIG = CONFIG.replace("epochs = 2", "epochs = 25")


def _commands(folder: Path) -> dict[str, list[str]]:
    """Each command as the test runs it, in ``folder`` (relative paths)."""
    return {
        "generate": [
            *("generate", "darcy", "-n", "160", "--resolution", "17", "--chunk-size", "8"),
            *("-o", "made.h5", "-q"),
        ],
        "train": ["train", "c.toml", "-q"],
        "predict": ["predict", "darcy-fno", "big.h5", "-o", "out.h5", "--batch-size", "4", "-q"],
        "convert": ["convert", "data.h5", "view.xdmf"],
    }


def _fenop(folder: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run
    return subprocess.Popen(
        [sys.executable, "-m", "fenop", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_by_default,
    )


def _run(folder: Path, args: list[str]) -> None:
    process = _fenop(folder, args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(folder: Path) -> dict[str, str]:
    return {name: _digest(folder / name) for name in ("data.h5", "big.h5", "c.toml")}


def _outputs(folder: Path, command: str) -> dict:
    """What a finished ``command`` made, as values to compare (not bytes: HDF5
    files of equal content may differ in layout)."""
    if command == "generate":
        with h5py.File(folder / "made.h5") as f:
            return {name: f[name][()] for name in ("a", "u")} | {"n": f.attrs["n_complete"]}
    if command == "predict":
        with h5py.File(folder / "out.h5") as f:
            return {"u": f["u"][()], "n": f.attrs["n_complete"]}
    if command == "convert":
        with h5py.File(folder / "view.h5") as f:
            arrays = {}
            f.visititems(
                lambda name, item: (
                    arrays.setdefault(name, item[()]) if isinstance(item, h5py.Dataset) else None
                )
            )
        return {"arrays": arrays, "xdmf": (folder / "view.xdmf").read_text()}
    run = folder / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {
        "epochs": [line.split(",")[0] for line in lines],
        "losses": [line.split('"seconds"')[0] for line in lines],  # all but the timing
        "last": load_file(run / "last" / "model.safetensors"),
        "best": load_file(run / "best" / "model.safetensors"),
    }


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A folder with the inputs, and each command's outputs and wall time when run
    without interruption (in a folder of its own)."""
    folder = tmp_path_factory.mktemp("inputs")
    _run(folder, ["generate", "darcy", "-n", "24", "--resolution", "9", "-o", "data.h5", "-q"])
    _run(folder, ["generate", "darcy", "-n", "120", "--resolution", "33", "-o", "big.h5", "-q"])
    (folder / "c.toml").write_text(CONFIG)
    results = {}
    for command, args in _commands(folder).items():
        work = _copy_inputs(folder, tmp_path_factory.mktemp(command))
        before = _listing(work)
        start = time.monotonic()
        _run(work, args)
        results[command] = (
            time.monotonic() - start,
            _outputs(work, command),
            sorted(set(_listing(work)) - set(before)),
        )
    return folder, results


def _copy_inputs(source: Path, folder: Path) -> Path:
    for name in ("data.h5", "big.h5", "c.toml"):
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


def _kill_and_rerun(reference, tmp_path, command: str, name: str, seed: int) -> None:
    source, results = reference
    seconds, expected, made = results[command]
    folder = _copy_inputs(source, tmp_path)
    inputs, before = _inputs(folder), _listing(folder)
    args = _commands(folder)[command]
    # A moment in the command's run, mostly past its start-up (imports take a while)
    delay = random.Random(f"{command}-{name}-{seed}").uniform(0.3, 1.0) * seconds
    process = _fenop(folder, args)
    time.sleep(delay)
    process.send_signal(SIGNALS[name])
    _, err = process.communicate(timeout=300)
    # (or killed by the signal itself, where it came as the process was ending)
    assert process.returncode in (0, STATUS[name], -SIGNALS[name]), (process.returncode, err)
    if process.returncode == STATUS[name] and name != "SIGKILL":
        assert len(err.strip().splitlines()) == 1, err  # one line: what was kept, or nothing
    assert _inputs(folder) == inputs
    if command in ("predict", "convert"):  # all of the output or none of it
        written = set(_listing(folder)) - set(before)
        visible = {p for p in written if not Path(p).name.startswith(".")}
        assert visible in (set(), set(made)), visible
        if visible:
            assert _equal(_outputs(folder, command), expected)
    again = list(args)
    if command == "train" and (folder / "run" / "last").is_dir():
        again.append("--resume")
    elif command in ("predict", "convert") and (folder / made[-1]).exists():
        again.append("--overwrite")
    _run(folder, again)
    assert _inputs(folder) == inputs
    assert _equal(_outputs(folder, command), expected)
    assert sorted(set(_listing(folder)) - set(before)) == made  # nothing else is left


# Each command once in the default run, each with another signal.
QUICK = [
    ("generate", "SIGKILL"),
    ("train", "SIGKILL"),
    ("predict", "SIGTERM"),
    ("convert", "SIGINT"),
]


@pytest.mark.parametrize(("command", "name"), QUICK)
def test_a_killed_command_leaves_its_inputs_and_the_next_run_finishes_it(
    reference, tmp_path, command, name
):
    _kill_and_rerun(reference, tmp_path, command, name, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", list(SIGNALS))
@pytest.mark.parametrize("command", ["generate", "train", "predict", "convert"])
def test_every_command_killed_by_every_signal_at_random_moments(
    reference, tmp_path, command, name, seed
):
    _kill_and_rerun(reference, tmp_path, command, name, seed)
