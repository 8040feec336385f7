import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import fenop.data.generation as generation
from fenop.data import StoreError, generate, open_store, read_header
from fenop.data.pdes import Darcy
from fenop.fem import l_shape, unit_square
from tests.helpers import ROOT, generation_workers, process_running, wait_for_samples


def _values(path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("a", "u")}


def _run_script(script: Path, text: str, *, timeout: float = 300):
    """Write ``text`` to ``script`` and run it in a fresh interpreter (whose workers
    run the script's module again, as they would a user's)."""
    script.write_text(text)
    # The repository on the path, so that a script can use this module's helpers.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, env=env
    )


def _generating(path: Path, n: int, *, side: int, seed: int, chunk_size: int):
    """A process generating ``n`` Darcy samples on ``unit_square(side)`` into ``path``."""
    script = (
        "from fenop.data import generate; from fenop.fem import unit_square; "
        f"generate('darcy', {n}, unit_square({side}), seed={seed}, path=r'{path}', "
        f"chunk_size={chunk_size}, progress=False)"
    )
    return subprocess.Popen([sys.executable, "-c", script])


def test_one_and_two_workers_write_the_same_file(tmp_path):
    one = generate(
        "darcy", 10, l_shape(9), seed=2, path=tmp_path / "one.h5", chunk_size=4, progress=False
    )
    two = generate(
        "darcy",
        10,
        l_shape(9),
        seed=2,
        path=tmp_path / "two.h5",
        chunk_size=4,
        workers=2,
        progress=False,
    )
    for name, value in _values(one).items():
        np.testing.assert_array_equal(value, _values(two)[name])
    assert read_header(two)["n_complete"] == 10


@pytest.mark.parametrize("boundary", ["dirichlet", "no_flux"])
def test_trajectories_from_one_and_two_workers_are_the_same_file(tmp_path, boundary):
    def run(name, workers):
        return generate(
            "heat",
            5,
            l_shape(9),
            seed=1,
            path=tmp_path / name,
            chunk_size=2,
            workers=workers,
            progress=False,
            n_steps=3,
            trajectory=True,
            boundary=boundary,
        )

    one, two = run("one.h5", 1), run("two.h5", 2)
    assert one.read_bytes() == two.read_bytes()
    with h5py.File(one) as f:
        assert f["u"].shape == (5, 4, 65) and f["time"].shape == (4,)
    # a no-flux family's space has no Dirichlet DOFs, in the workers too
    assert read_header(one)["dirichlet"] == {"dirichlet": "boundary", "no_flux": "none"}[boundary]


def test_dask_cluster_writes_the_same_file(tmp_path):
    distributed = pytest.importorskip("distributed", reason="the cluster extra is not installed")
    local = generate(
        "darcy", 7, l_shape(9), seed=2, path=tmp_path / "local.h5", chunk_size=3, progress=False
    )
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        remote = generate(
            "darcy",
            7,
            l_shape(9),
            seed=2,
            path=tmp_path / "cluster.h5",
            chunk_size=3,
            progress=False,
            scheduler=cluster.scheduler_address,
        )
    for name, value in _values(local).items():
        np.testing.assert_array_equal(value, _values(remote)[name])


def test_interrupted_run_resumes_to_the_same_values(tmp_path, monkeypatch):
    reference = generate(
        "poisson",
        11,
        unit_square(9),
        seed=1,
        path=tmp_path / "ref.h5",
        chunk_size=3,
        progress=False,
    )

    calls = []
    real_write = generation.write_samples

    def write_then_interrupt(path, start, values):
        real_write(path, start, values)
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after two chunks

    monkeypatch.setattr(generation, "write_samples", write_then_interrupt)
    path = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        generate("poisson", 11, unit_square(9), seed=1, path=path, chunk_size=3, progress=False)
    assert read_header(path)["n_complete"] == 6
    with open_store(path, allow_partial=True) as partial:
        assert partial.sizes["sample"] == 6

    monkeypatch.setattr(generation, "write_samples", real_write)
    generate("poisson", 11, unit_square(9), seed=1, path=path, chunk_size=3, progress=False)
    with h5py.File(reference) as f, h5py.File(path) as g:
        for name in ("f", "u"):
            np.testing.assert_array_equal(f[name][()], g[name][()])


def test_killed_process_leaves_a_readable_file_that_resumes(tmp_path):
    """SIGKILL mid-run: the complete chunks survive and the rerun matches an uninterrupted run."""
    path = tmp_path / "killed.h5"
    process = _generating(path, 400, side=17, seed=4, chunk_size=5)
    try:
        wait_for_samples(path, 10)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    header = read_header(path)
    assert 10 <= header["n_complete"] < 400, "the run ended before it could be killed mid-way"
    with open_store(path, allow_partial=True) as partial:
        assert np.isfinite(partial["u"].values).all()

    generate("darcy", 400, unit_square(17), seed=4, path=path, chunk_size=5, progress=False)
    reference = generate(
        "darcy",
        400,
        unit_square(17),
        seed=4,
        path=tmp_path / "ref.h5",
        chunk_size=5,
        progress=False,
    )
    for name, value in _values(reference).items():
        np.testing.assert_array_equal(value, _values(path)[name])


def test_existing_file_of_another_recipe_is_left_alone(tmp_path):
    path = generate("darcy", 3, unit_square(5), seed=0, path=tmp_path / "d.h5", progress=False)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="different seed"):
        generate("darcy", 3, unit_square(5), seed=1, path=path, progress=False)
    with pytest.raises(StoreError, match="different mesh"):
        generate("darcy", 3, unit_square(6), seed=0, path=path, progress=False)
    with pytest.raises(StoreError, match="different parameters"):
        generate("darcy", 3, unit_square(5), seed=0, path=path, progress=False, a_high=10.0)
    assert path.read_bytes() == before
    generate("darcy", 3, unit_square(5), seed=1, path=path, progress=False, overwrite=True)
    assert read_header(path)["seed"] == 1


def test_a_second_generation_into_the_same_file_is_refused_while_the_first_runs(tmp_path):
    path = tmp_path / "d.h5"
    process = _generating(path, 3000, side=33, seed=0, chunk_size=8)
    try:
        wait_for_samples(path, 8)
        # The same recipe would resume and collide with the first; with overwrite it
        # would replace the file under it. Either is refused, naming the process.
        for overwrite in (False, True):
            with pytest.raises(StoreError, match=f"is being generated by process {process.pid}"):
                generate(
                    "darcy",
                    3000,
                    unit_square(33),
                    seed=0,
                    path=path,
                    overwrite=overwrite,
                    progress=False,
                )
        wait_for_samples(path, 24)  # untouched: still growing
    finally:
        process.kill()
        process.wait()
    # Its lock went with it: another call gets as far as comparing recipes.
    with pytest.raises(StoreError, match="different seed"):
        generate("darcy", 3000, unit_square(33), seed=1, path=path, progress=False)
    generate("darcy", 4, unit_square(9), seed=0, path=tmp_path / "e.h5", progress=False)
    # No lock file stays beside a store once its generation ends, even one whose
    # generation was killed (the next run took it over and removed it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "e.h5"]


def test_generation_goes_on_unguarded_where_the_file_system_has_no_flock(tmp_path, monkeypatch):
    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")  # as some network mounts say

    monkeypatch.setattr(fcntl, "flock", no_locks)
    generate("darcy", 3, unit_square(5), seed=0, path=tmp_path / "d.h5", progress=False)
    assert read_header(tmp_path / "d.h5")["n_complete"] == 3


def test_bad_arguments_write_nothing(tmp_path):
    path = tmp_path / "x.h5"
    with pytest.raises(ValueError, match="unknown PDE"):
        generate("navier-stokes", 3, unit_square(5), seed=0, path=path)
    with pytest.raises(ValueError, match="n_samples"):
        generate("darcy", 0, unit_square(5), seed=0, path=path)
    with pytest.raises(ValueError, match="darcy has no option 'viscosity'; its options: a_high"):
        generate("darcy", 3, unit_square(5), seed=0, path=path, viscosity=1.0)
    with pytest.raises(ValueError, match="`seed` must be a non-negative int, got -1"):
        generate("darcy", 3, unit_square(5), seed=-1, path=path)
    with pytest.raises(ValueError, match="all 4 DOFs of this space lie on the Dirichlet"):
        generate("darcy", 3, unit_square(2), seed=0, path=path)
    assert not os.path.exists(path)


def _fail_at(index: int, error: Exception):
    """``Darcy.sample``, failing at sample ``index`` with ``error``."""
    real = Darcy.sample

    def sample(self, seed, i):
        if i == index:
            raise error
        return real(self, seed, i)

    return sample


def test_a_failing_sample_is_named_and_the_chunks_before_it_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(Darcy, "sample", _fail_at(5, np.linalg.LinAlgError("singular matrix")))
    path = tmp_path / "d.h5"
    expected = (
        r"d.h5: sample 5 \(seed 0\) failed: LinAlgError: singular matrix; "
        "the 4 samples already written are kept"
    )
    with pytest.raises(generation.SampleError, match=expected) as caught:
        generate("darcy", 8, unit_square(5), seed=0, path=path, chunk_size=2, progress=False)
    assert isinstance(caught.value.__cause__, np.linalg.LinAlgError)
    assert read_header(path)["n_complete"] == 4
    # Where nothing was written, the store this call began is not left behind.
    empty = tmp_path / "e.h5"
    with pytest.raises(generation.SampleError, match=r"sample 5 .* nothing was written"):
        generate("darcy", 8, unit_square(5), seed=0, path=empty, chunk_size=8, progress=False)
    assert not empty.exists()
    monkeypatch.undo()
    generate("darcy", 8, unit_square(5), seed=0, path=path, chunk_size=2, progress=False)
    assert read_header(path)["n_complete"] == 8


def test_a_sample_failing_in_a_worker_is_named(tmp_path):
    path = tmp_path / "d.h5"
    result = _run_script(
        tmp_path / "failing.py",
        "from fenop.data import generate\n"
        "from fenop.data.pdes import Darcy\n"
        "from fenop.fem import unit_square\n"
        "from tests.data.test_generation import _fail_at\n"
        "# At module level: each worker runs this script again, and fails too.\n"
        "Darcy.sample = _fail_at(6, FloatingPointError('diverged'))\n"
        "if __name__ == '__main__':\n"
        f"    generate('darcy', 12, unit_square(9), seed=3, path=r'{path}', workers=2, "
        "chunk_size=3, progress=False)\n",
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fenop.data.generation.SampleError: ")
    kept = re.search(r"sample 6 \(seed 3\) failed: FloatingPointError: diverged; the (\d) ", last)
    assert kept and int(kept[1]) == read_header(path)["n_complete"] == 6  # 0-5, before it


def test_a_dead_worker_gives_one_clear_error(tmp_path):
    # A script that calls generate() with workers outside the __main__ guard: each
    # worker runs the script again and dies trying to start workers of its own.
    path = tmp_path / "unguarded.h5"
    result = _run_script(
        tmp_path / "unguarded.py",
        "from fenop.data import generate\n"
        "from fenop.fem import unit_square\n"
        f"generate('darcy', 8, unit_square(9), seed=0, path=r'{path}', workers=2, "
        "progress=False)\n",
    )
    assert result.returncode != 0
    # The workers' own tracebacks come first; the caller's error names the file.
    errors = [line for line in result.stderr.splitlines() if "Error: " in line]
    (error,) = [line for line in errors if str(path) in line]
    assert "if __name__ == '__main__':" in error and "resumes" in error


def test_a_worker_dying_halfway_through_a_result_is_seen_at_once(tmp_path):
    # Killed while sending, a worker leaves half a message in its pipe: the caller
    # must see the death, not wait for the rest of the message for ever.
    path = tmp_path / "d.h5"
    result = _run_script(
        tmp_path / "half.py",
        "import multiprocessing, os, struct\n"
        "from multiprocessing.connection import Connection\n"
        "from multiprocessing.reduction import ForkingPickler\n"
        "from fenop.data import generate\n"
        "from fenop.fem import unit_square\n"
        "send = Connection.send\n"
        "def half_then_die(self, message):\n"
        "    index, result = message\n"
        "    if multiprocessing.parent_process() and isinstance(result, dict) and index == 5:\n"
        "        data = bytes(ForkingPickler.dumps(message))\n"
        "        self._send(struct.pack('!i', len(data)) + data[: len(data) // 2])\n"
        "        os._exit(9)\n"
        "    send(self, message)\n"
        "# At module level: each worker runs this script again.\n"
        "Connection.send = half_then_die\n"
        "if __name__ == '__main__':\n"
        f"    generate('darcy', 12, unit_square(17), seed=0, path=r'{path}', workers=2, "
        "chunk_size=2, progress=False)\n",
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fenop.data.generation.WorkerDiedError: ")
    assert "a worker process died (exit status 9)" in last
    kept = re.search(r"the (\d+) samples written are kept", last)
    assert kept and int(kept[1]) == read_header(path)["n_complete"] <= 4  # before sample 5


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_workers_end_when_their_caller_is_killed(tmp_path):
    path = tmp_path / "orphans.h5"
    script = tmp_path / "caller.py"
    script.write_text(
        "from fenop.data import generate\n"
        "from fenop.fem import unit_square\n"
        "if __name__ == '__main__':\n"
        f"    generate('darcy', 3000, unit_square(33), seed=0, path=r'{path}', workers=2, "
        "chunk_size=8, progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, str(script)])
    try:
        wait_for_samples(path, 16)
        server, workers = generation_workers(process.pid)
        assert workers, "no worker process found"
    finally:
        process.kill()
        process.wait()
    # Without a way to notice, the workers would wait for tasks forever (and keep
    # the forkserver alive): each would hold its memory until the machine restarts.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(process_running, [server, *workers])):
        time.sleep(0.1)
    assert not [pid for pid in [server, *workers] if process_running(pid)]


def test_workers_do_not_import_the_operators():
    # The workers' forkserver imports fenop.data._workers: it should not pay for
    # neuraloperator (or any network code) the workers never use.
    code = (
        "import sys, fenop.data._workers, fenop; "
        "assert 'neuralop' not in sys.modules and 'fenop.operators' not in sys.modules; "
        "fenop.operators; assert 'neuralop' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_store_interrupted_while_it_is_created_leaves_no_file(tmp_path, monkeypatch):
    # HDF5 writes the layout in several steps; a kill among them must not leave a
    # truncated file where the next run would try to resume
    path = tmp_path / "d.h5"
    create = generation.create_store

    def half_created(staging, *args, **kwargs):
        Path(staging).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(88))  # a truncated file
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "create_store", half_created)
    with pytest.raises(KeyboardInterrupt):
        generate("darcy", 2, unit_square(5), seed=0, path=path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(generation, "create_store", create)
    generate("darcy", 2, unit_square(5), seed=0, path=path, progress=False)
    assert read_header(path)["n_complete"] == 2
