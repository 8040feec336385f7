"""Generate a data set of PDE samples into a store, in parallel, resumably.

Sample ``i`` depends only on ``(seed, i)``, so the file is the same whatever the
number of workers, and a resumed run completes an interrupted one with exactly the
values an uninterrupted run would have written.

>>> import tempfile, pathlib
>>> from fenop.fem import unit_square
>>> path = pathlib.Path(tempfile.mkdtemp()) / "darcy.h5"
>>> generate("darcy", 4, unit_square(9), seed=0, path=path, progress=False)
PosixPath('...darcy.h5')
>>> from fenop.data import open_store
>>> open_store(path)["u"].shape
(4, 81)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import numbers
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import skfem
from tqdm.auto import tqdm

from fenop._checks import unknown_options
from fenop.data.pdes import PDEFamily, get_pde
from fenop.data.store import StoreError, create_store, read_header, store_space, write_samples
from fenop.fem import FunctionSpace

__all__ = ["SampleError", "WorkerDiedError", "generate"]


class WorkerDiedError(RuntimeError):
    """A local worker process ended before finishing its samples; the store resumes."""


class SampleError(RuntimeError):
    """Computing one sample failed; its cause is the solver's (or sampler's) error."""


class _SampleFailed(Exception):
    """Which sample failed, and how (with the traceback as text, which crosses from a
    worker process where the error itself, chained, would not)."""

    def __init__(self, index: int, description: str, details: str):
        super().__init__(index, description, details)
        self.index, self.description, self.details = index, description, details


class _WorkerTraceback(Exception):
    """The traceback of an error raised in another process, as text."""


def _compute(family: PDEFamily, seed: int, index: int) -> dict[str, np.ndarray]:
    """Sample ``index``; what it raises comes back as a :class:`_SampleFailed` naming
    the sample, wherever it was computed (here, in a worker or on a cluster)."""
    try:
        return family.sample(seed, index)
    except Exception as error:
        description = f"{type(error).__name__}: {error}"
        raise _SampleFailed(index, description, traceback.format_exc()) from error


# A recipe rebuilds the same PDE family in a worker process: cheap to send. Local
# workers build it once when they start; cluster workers cache it by content.
_Recipe = tuple[str, dict, int, np.ndarray, np.ndarray, str]
_cluster_families: dict[str, PDEFamily] = {}


def _build(recipe: _Recipe) -> PDEFamily:
    name, options, degree, points, cells, mesh_type = recipe
    mesh = getattr(skfem, mesh_type)(points, cells)
    space = FunctionSpace(mesh, degree=degree, dirichlet="boundary")
    return get_pde(name)(space, **options)


def _recipe_key(recipe: _Recipe) -> str:
    name, options, degree, points, cells, mesh_type = recipe
    digest = hashlib.sha256(points.tobytes() + cells.tobytes()).hexdigest()
    return json.dumps([name, options, degree, mesh_type, digest], sort_keys=True)


def _cluster_task(recipe: _Recipe, seed: int, index: int) -> dict[str, np.ndarray]:
    key = _recipe_key(recipe)
    family = _cluster_families.get(key)
    if family is None:
        _cluster_families.clear()
        family = _cluster_families[key] = _build(recipe)
    return _compute(family, seed, index)


def _worker(recipe: _Recipe, connection: multiprocessing.connection.Connection) -> None:
    """A local worker: computes the ``(seed, index)`` tasks it receives, in turn.

    It ends when its caller closes the pipe (after the last task, or however the
    caller ended) or sends ``None``. Results go out from a thread of their own, so
    that the worker computes on while its caller is busy (writing a chunk) rather
    than waiting for it to read. Ctrl-C is the caller's to handle: it ends the
    workers itself, without a traceback from each.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    family = _build(recipe)
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_results():
        try:
            while (message := outbox.get()) is not None:
                connection.send(message)
        except OSError:  # the caller has gone
            pass

    sender = threading.Thread(target=send_results, daemon=True)
    sender.start()
    try:
        while (task := connection.recv()) is not None:
            seed, index = task
            try:
                result = _compute(family, seed, index)
            except _SampleFailed as failure:
                result = failure  # sent in its turn; the caller raises it
            outbox.put((index, result))
    except (EOFError, OSError):  # the caller has gone: nothing left to do
        pass
    outbox.put(None)
    sender.join()


# Set in every local worker's environment (see _only_writer).
_WORKER_MARK = "FENOP_GENERATION_WORKER"


def _worker_env() -> dict[str, str]:
    # Each worker owns one core: BLAS threads inside workers would oversubscribe it.
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {**{name: "1" for name in names}, _WORKER_MARK: "1"}


def _pool_context() -> multiprocessing.context.BaseContext:
    """How local workers start: from a forkserver where there is one, else by spawn.

    Never by a plain fork, which would copy the caller's threads' locks and its CUDA
    state. A forkserver imports this module (with torch and SciPy) once and forks every
    worker from it, where spawn makes each worker import them again: 16 workers
    doing so at once took over a minute on a 16-core GPU machine. Each worker still
    runs the caller's main module again, so the server also imports neuraloperator
    if the caller has: a training script's imports then cost the workers nothing.
    Spawn remains where there is no forkserver, as on Windows.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the server starts, with the process's first workers.
    context.set_forkserver_preload([__name__, *(m for m in ("neuralop",) if m in sys.modules)])
    return context


def _samples(
    recipe: _Recipe, family: PDEFamily, seed: int, indices: range, workers: int, scheduler
) -> Iterator[dict[str, np.ndarray]]:
    """The samples of ``indices``, in order, computed locally or on a cluster."""
    if scheduler is not None:
        yield from _samples_on_cluster(recipe, seed, indices, scheduler)
    elif workers == 1:
        for index in indices:
            yield _compute(family, seed, index)
    else:
        yield from _samples_on_workers(recipe, seed, indices, workers)


class _WorkerDied(Exception):
    """A local worker ended before its tasks were done; the argument says how."""


def _samples_on_workers(
    recipe: _Recipe, seed: int, indices: range, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """The samples of ``indices``, in order, from local worker processes.

    Each worker has a pipe of its own rather than a queue shared by all, as
    ``concurrent.futures.ProcessPoolExecutor`` has: a worker killed while writing a
    result there leaves half a message, and the executor waits for the rest for
    ever (observed about once in a dozen kills). Here the dead worker's own pipe
    ends and its process sentinel fires, so the death is seen at once.
    """
    context = _pool_context()
    connections: list[multiprocessing.connection.Connection] = []
    processes = {}  # connection -> its worker
    # Workers read these when they start (from a forkserver: when the server starts,
    # with the process's first workers, and it keeps them); then the caller's again.
    saved = {name: os.environ.get(name) for name in _worker_env()}
    os.environ.update(_worker_env())
    finished = False
    try:
        for _ in range(min(workers, len(indices))):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(recipe, theirs), daemon=True)
            process.start()
            theirs.close()
            connections.append(ours)
            processes[ours] = process
        _restore(saved)
        in_flight = {connection: 0 for connection in connections}
        done: dict[int, dict | _SampleFailed] = {}
        unsent = iter(indices)
        upcoming = next(unsent, None)
        # Tasks go out in order, three per worker at a time (one to compute while
        # up to two wait to be sent or read), and no further ahead of the next
        # sample due than this, so that one slow sample holds back a bounded
        # number of finished ones.
        window = 6 * len(connections)
        for due in indices:
            while due not in done:
                for connection in connections:
                    while (
                        in_flight[connection] < 3
                        and upcoming is not None
                        and upcoming < due + window
                    ):
                        try:
                            connection.send((seed, upcoming))
                        except OSError:  # its worker has died
                            raise _died(processes[connection]) from None
                        in_flight[connection] += 1
                        upcoming = next(unsent, None)
                sentinels = {processes[c].sentinel: processes[c] for c in connections}
                for ready in multiprocessing.connection.wait([*connections, *sentinels]):
                    if ready in sentinels:
                        raise _died(sentinels[ready])
                    try:
                        index, result = ready.recv()
                    except (EOFError, OSError):  # died mid-message
                        raise _died(processes[ready]) from None
                    in_flight[ready] -= 1
                    done[index] = result
            result = done.pop(due)
            if isinstance(result, _SampleFailed):
                raise result
            yield result
        finished = True
    finally:
        _restore(saved)
        for connection in connections:
            connection.close()  # a worker's next recv ends it
        for process in processes.values():
            if not finished:  # interrupted or failed: the samples in work are not wanted
                process.kill()
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join()


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _died(process: multiprocessing.process.BaseProcess) -> _WorkerDied:
    """The error for a worker that has ended (or whose pipe has), saying how it ended."""
    process.join(1.0)  # its pipe can close a moment before its exit status is known
    code = process.exitcode
    if code is None:
        return _WorkerDied("its pipe closed")
    if code < 0:
        return _WorkerDied(f"killed by {signal.Signals(-code).name}")
    return _WorkerDied(f"exit status {code}")


def _samples_on_cluster(recipe: _Recipe, seed: int, indices: range, scheduler: str):
    try:
        from dask.distributed import Client
    except ImportError:
        raise ImportError(
            "sending samples to a cluster needs dask.distributed: pip install 'fenop[cluster]'"
        ) from None
    with Client(scheduler) as client:
        shared = client.scatter(recipe, broadcast=True)
        futures = client.map(
            _cluster_task,
            [shared] * len(indices),
            [seed] * len(indices),
            list(indices),
            pure=False,
        )
        for future in futures:
            yield future.result()


def _describe(family: PDEFamily, seed: int, n_samples: int) -> dict:
    return {
        "pde": family.name,
        "parameters": family.parameters(),
        "seed": int(seed),
        "n_samples": int(n_samples),
        "element": family.space.element,
        "dirichlet": "boundary",
        "fields": list(family.fields),
    }


def _resume_from(path: Path, family: PDEFamily, expected: dict) -> tuple[int, int]:
    """Samples already complete in an existing store made by the same recipe, and the
    store's chunk size."""
    header = read_header(path)
    differs = [key for key, value in expected.items() if header.get(key) != value]
    if not differs:
        stored = store_space(path).mesh
        mesh = family.space.mesh
        if stored.p.shape != mesh.p.shape or not (
            np.array_equal(stored.p, mesh.p) and np.array_equal(stored.t, mesh.t)
        ):
            differs = ["mesh"]
    if differs:
        raise StoreError(
            path,
            f"exists and was made with a different {', '.join(differs)}; "
            "choose another output path or overwrite it",
        )
    return int(header["n_complete"]), int(header["chunk_size"])


@contextlib.contextmanager
def _only_writer(path: Path):
    """While it lasts, no other process generates into ``path``.

    A second ``generate`` on the same file would resume from the chunks it sees and
    then collide with the first (or, with ``overwrite``, replace the file under it).
    The lock is an advisory ``flock`` on a file beside the store, which the kernel
    releases however the holder ends; it is removed when generation ends.
    """
    # Not in a worker either: one that runs its caller's unguarded script again
    # must fail as multiprocessing explains it (the `__main__` guard), not here.
    if fcntl is None or os.environ.get(_WORKER_MARK) == "1":
        yield  # (no flock on Windows)
        return
    if not path.parent.is_dir():
        raise StoreError(path, f"cannot be written, folder {path.parent} does not exist")
    lock = path.with_name(f".{path.name}.lock")
    while True:
        handle = open(lock, "a+")  # held open, with its lock, for the whole generation
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(
                path, f"is being generated by {holder}; wait for it to end, or write elsewhere"
            ) from None
        # The holder before us may have removed the lock file as we opened it: a lock
        # on a file no longer at ``lock`` guards nothing, so take the new one.
        try:
            current = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def generate(
    pde: str,
    n_samples: int,
    mesh: skfem.Mesh,
    *,
    seed: int,
    path: str | os.PathLike,
    degree: int = 1,
    workers: int = 1,
    chunk_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
    **options,
) -> Path:
    """Solve ``n_samples`` samples of a PDE family on ``mesh`` and store them.

    Args:
        pde: the family's name (see :data:`fenop.data.pdes.PDES`).
        n_samples: number of samples.
        mesh: the mesh; the space is ``degree`` Lagrange elements with u = 0 on
            the whole boundary.
        seed: the data set's seed; sample ``i`` depends on ``(seed, i)`` only.
        path: the HDF5 file. If it exists, was made by the same recipe and is
            incomplete, generation resumes; if complete, nothing is done.
        degree: polynomial degree of the FE space.
        workers: local worker processes. As with any multiprocessing, a script
            that asks for more than one calls ``generate`` under
            ``if __name__ == "__main__":``, since each worker runs the script's
            module again.
        chunk_size: samples written per chunk (what an interruption can lose).
        overwrite: replace an existing file made by another recipe.
        progress: show a progress bar.
        scheduler: address of a dask.distributed scheduler: the samples are
            computed on that cluster instead of local workers.
        **options: the family's own options (e.g. ``a_high`` for Darcy).

    Returns:
        The path of the complete store.

    Raises:
        SampleError: a sample's solve (or draw) failed; the message names the
            sample, and its cause is the original error. The chunks written before
            it are kept; a store this call began, with nothing in it, is removed.
        WorkerDiedError: a local worker died (killed, out of memory); the chunks
            written are kept and the same call resumes.
        StoreError: ``path`` holds another recipe's samples (without
            ``overwrite``), or another process is generating into it.
    """
    path = Path(path)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"`n_samples` must be a positive int, got {n_samples!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be a positive int, got {workers!r}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
    family_type = get_pde(pde)
    problem = unknown_options(family_type, options, name=family_type.name)
    if problem:
        raise ValueError(problem)
    space = FunctionSpace(mesh, degree=degree, dirichlet="boundary")
    family = family_type(space, **options)
    expected = _describe(family, seed, n_samples)

    with _only_writer(path):
        start, created = 0, False
        if path.exists() and not overwrite:
            start, chunk_size = _resume_from(path, family, expected)
        else:
            created = True
            create_store(
                path,
                space,
                fields=family.fields,
                n_samples=n_samples,
                chunk_size=chunk_size,
                attrs={
                    key: value
                    for key, value in expected.items()
                    if key not in ("element", "fields", "n_samples")
                },
            )
        if start >= n_samples:
            return path

        recipe: _Recipe = (
            family.name,
            options,
            degree,
            mesh.p,
            mesh.t,
            type(mesh).__name__,
        )
        bar = tqdm(
            total=n_samples,
            initial=start,
            desc=f"{family.name} -> {path.name}",
            unit="sample",
            disable=not progress,
        )
        buffer: list[dict[str, np.ndarray]] = []
        samples = _samples(recipe, family, seed, range(start, n_samples), workers, scheduler)
        with bar:
            try:
                for sample in samples:
                    buffer.append(sample)
                    bar.update(1)
                    if len(buffer) == chunk_size or start + len(buffer) == n_samples:
                        write_samples(
                            path,
                            start,
                            {k: np.stack([s[k] for s in buffer]) for k in family.fields},
                        )
                        start += len(buffer)
                        buffer.clear()
            except _WorkerDied as error:
                raise WorkerDiedError(
                    f"{path}: a worker process died ({error}) before finishing its samples (out of "
                    "memory, killed, or, from a script, generate() called outside "
                    "`if __name__ == '__main__':`, which every worker runs again); the "
                    f"{start} samples written are kept, and the same call resumes from there"
                ) from error
            except _SampleFailed as failure:
                # The same call would fail at the same sample again (sample i depends on
                # (seed, i) only), so a store this call began holds nothing worth keeping.
                if created and start == 0:
                    path.unlink(missing_ok=True)
                    kept = "nothing was written"
                else:
                    kept = f"the {start} samples already written are kept"
                raise SampleError(
                    f"{path}: sample {failure.index} (seed {seed}) failed: "
                    f"{failure.description}; {kept}"
                ) from failure.__cause__ or _WorkerTraceback(f"\n{failure.details}")
    return path
