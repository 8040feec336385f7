"""Helpers shared by the tests."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

# Device-move tests run on every device present; CUDA is skipped, and said so, without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]

# A constraint layer's formulation alone: the two-grid cycle the layers add by
# default (Jacobi sweeps and a coarse grid around the solve) turned off, and for a
# residual that is not affine Newton's root, for tests of the solve itself.
PLAIN = {"smoothing": 0, "coarse_grid": 0, "global_solve": "newton"}


def l_shape_interior_points(rng: np.random.Generator, n: int, *, margin: float = 1e-6):
    """``n`` uniform random points of the open L-shape (-1, 1)^2 minus [0, 1) x (-1, 0]."""
    points = []
    while sum(len(p) for p in points) < n:
        p = rng.uniform(-1 + margin, 1 - margin, size=(2 * n, 2))
        keep = ~((p[:, 0] > -margin) & (p[:, 1] < margin))
        points.append(p[keep])
    return np.concatenate(points)[:n]


def loglog_slope(h, error) -> float:
    """Least-squares slope of log(error) against log(h): the observed convergence order."""
    return float(np.polyfit(np.log(h), np.log(error), 1)[0])


ROOT = Path(__file__).resolve().parent.parent

# A training configuration small enough for tests: an MgNO on a store "d.h5" of
# 16 samples beside it.
SMALL_CONFIG = """
[data]
path = "d.h5"
n_train = 12
n_test = 4

[model]
processor = "mgno"
resolution = 8
[model.options]
width = 4
n_layers = 1

[training]
epochs = 2
batch_size = 4
output = "run"
device = "cpu"
"""


def load_script(relative_path: str):
    """Import a script of the repository (an example, a benchmark) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unstructured_square(n_interior: int, n_side: int, seed: int):
    """An unstructured Delaunay triangulation of the unit square: ``n_side`` points on
    each side and ``n_interior`` random points inside.

    Returns ``(points (n, 2), triangles (m, 3))``.
    """
    import scipy.spatial

    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n_side)
    zero, one = np.zeros_like(t), np.ones_like(t)
    boundary = np.concatenate(
        [
            np.stack([t, zero], 1),
            np.stack([t, one], 1),
            np.stack([zero, t], 1)[1:-1],
            np.stack([one, t], 1)[1:-1],
        ]
    )
    points = np.concatenate([boundary, rng.uniform(0.02, 0.98, size=(n_interior, 2))])
    return points, scipy.spatial.Delaunay(points).simplices


def unstructured_square_mesh(n_interior: int, n_side: int, seed: int):
    """:func:`unstructured_square` as a scikit-fem ``MeshTri``."""
    import skfem

    points, triangles = unstructured_square(n_interior, n_side, seed)
    return skfem.MeshTri(points.T.copy(), triangles.T.copy())


def write_unstructured_square(path, n_interior: int, n_side: int, seed: int):
    """:func:`unstructured_square` written as a mesh file (Gmsh for ``.msh``); returns ``path``."""
    import meshio

    points, triangles = unstructured_square(n_interior, n_side, seed)
    meshio.write(path, meshio.Mesh(np.c_[points, np.zeros(len(points))], [("triangle", triangles)]))
    return path


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # ended meanwhile
            continue
        if f"PPid:\t{pid}" in lines:
            children.append(int(status.parent.name))
    return children


def command_line(pid: int) -> str:
    """Process ``pid``'s command line (Linux /proc), or ``""`` if it has ended (a
    child listed a moment ago may have)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has ended)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    return not any(line.startswith("State:\tZ") for line in lines)


def generation_workers(pid: int) -> tuple[int, list[int]]:
    """The forkserver started by process ``pid`` for data generation, and its workers."""
    (server,) = [child for child in child_processes(pid) if "forkserver" in command_line(child)]
    return server, child_processes(server)


def wait_for_samples(path, count: int, *, timeout: float = 120.0) -> None:
    """Wait until the store at ``path`` (written by another process) has ``count`` samples."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if int(f.attrs["n_complete"]) >= count:
                    return
        except (OSError, KeyError):  # not created yet, or mid-write
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach {count} samples in {timeout} s")


def launch(script: Path, *args: str, processes: int = 1, timeout: float = 300):
    """Run ``script args`` on ``processes`` processes (torchrun, gloo on the CPU; a
    plain run for one), one thread each; the ``subprocess.CompletedProcess``."""
    command = [sys.executable, str(script), *args]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone"]
        command.insert(4, f"--nproc_per_node={processes}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def sigint_by_default() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child takes Ctrl-C as from a
    terminal even where the tests run with SIGINT ignored (a shell's background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- fuzzing the boundary ----------------------------------------------------------------
# Values of every kind a user may write where fenop expects one (hypothesis
# strategies): numbers out of range, NaN and Inf, text that looks like JSON or not,
# lists, tables, booleans. The fuzz tests take FUZZ_EXAMPLES of them in the default
# run and FUZZ_EXAMPLES_SLOW under -m slow.
FUZZ_EXAMPLES, FUZZ_EXAMPLES_SLOW = 40, 400


def fuzz_settings(examples: int):
    """hypothesis's settings for a fuzz test of ``examples`` examples: the default
    run's examples are the same every run (derandomised: CI is never red by chance),
    the long run's new ones each time; no example database is written."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=examples <= FUZZ_EXAMPLES,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def fuzz_values(*, tables: bool = True):
    """A hypothesis strategy of JSON- and TOML-like values of every type."""
    from hypothesis import strategies as st

    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
    scalars = st.one_of(
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.sampled_from([0, 1, -1, 2, 10**6]),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
        st.sampled_from(["", "[", "{", "[a, u]", "{not json", "nan", "P1", "darcy", "a/b"]),
    )
    if not tables:
        return st.one_of(
            scalars, st.lists(st.integers(-5, 5), max_size=3), st.lists(text, max_size=3)
        )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)
        ),
        max_leaves=6,
    )


def one_line_naming(message: str, *paths) -> bool:
    """Whether ``message`` is one line that names one of ``paths``."""
    return "\n" not in message.strip() and any(str(p) in message for p in paths)


def toml_value(value) -> str:
    """``value`` (a fuzzed one) written as TOML: NaN and Inf as TOML spells them,
    strings with JSON's escapes (which TOML shares), tables inline."""
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    items = (f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items())
    return "{" + ", ".join(items) + "}"
