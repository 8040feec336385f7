"""Where generation's samples are computed: here, in local worker processes, or on
a dask cluster; in index order, whatever the number of workers.

Local workers have a pipe each rather than a queue shared by all, as
``concurrent.futures.ProcessPoolExecutor`` has: a worker killed while writing a
result there leaves half a message, and the executor waits for the rest for ever
(observed about once in a dozen kills; BENCHMARKS.md, "Local workers"). Here the
dead worker's own pipe ends and its process sentinel fires, so the death is seen
at once.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

import numpy as np
import skfem

from fenop.data.pdes import PDEFamily, get_pde
from fenop.fem import FunctionSpace


class SampleFailed(Exception):
    """Which sample failed, and how (with the traceback as text, which crosses from a
    worker process where the error itself, chained, would not)."""

    def __init__(self, index: int, description: str, details: str):
        super().__init__(index, description, details)
        self.index, self.description, self.details = index, description, details


class WorkerDied(Exception):
    """A local worker ended before its tasks were done; the argument says how."""


def _compute(family: PDEFamily, seed: int, index: int) -> dict[str, np.ndarray]:
    """Sample ``index``; what it raises comes back as a :class:`SampleFailed` naming
    the sample, wherever it was computed (here, in a worker or on a cluster)."""
    try:
        return family.sample(seed, index)
    except Exception as error:
        description = f"{type(error).__name__}: {error}"
        raise SampleFailed(index, description, traceback.format_exc()) from error


# A recipe rebuilds the same PDE family in a worker process: cheap to send. Local
# workers build it once when they start; cluster workers cache it by content.
Recipe = tuple[str, dict, int, np.ndarray, np.ndarray, str]
_cluster_families: dict[str, PDEFamily] = {}


def _build(recipe: Recipe) -> PDEFamily:
    name, options, degree, points, cells, mesh_type = recipe
    mesh = getattr(skfem, mesh_type)(points, cells)
    family = get_pde(name)
    space = FunctionSpace(mesh, degree=degree, dirichlet=family.dirichlet_for(options))
    return family(space, **options)


def _recipe_key(recipe: Recipe) -> str:
    name, options, degree, points, cells, mesh_type = recipe
    digest = hashlib.sha256(points.tobytes() + cells.tobytes()).hexdigest()
    return json.dumps([name, options, degree, mesh_type, digest], sort_keys=True)


def _cluster_task(recipe: Recipe, seed: int, index: int) -> dict[str, np.ndarray]:
    key = _recipe_key(recipe)
    family = _cluster_families.get(key)
    if family is None:
        _cluster_families.clear()
        family = _cluster_families[key] = _build(recipe)
    return _compute(family, seed, index)


def _worker(recipe: Recipe, connection: multiprocessing.connection.Connection) -> None:
    """A local worker: computes the ``(seed, index)`` tasks it receives, in turn.

    It ends when its caller closes the pipe (after the last task, or however the
    caller ended). Results go out from a thread of their own, so
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
        while True:
            seed, index = connection.recv()
            try:
                result = _compute(family, seed, index)
            except SampleFailed as failure:
                result = failure  # sent in its turn; the caller raises it
            outbox.put((index, result))
    except (EOFError, OSError):  # the caller has gone: nothing left to do
        pass
    outbox.put(None)
    sender.join()


# Set in every local worker's environment: generation's lock on the store skips them.
WORKER_MARK = "FENOP_GENERATION_WORKER"


def _worker_env() -> dict[str, str]:
    # Each worker owns one core: BLAS threads inside workers would oversubscribe it.
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {**{name: "1" for name in names}, WORKER_MARK: "1"}


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


def _start_forkserver() -> None:
    """Start the forkserver (if it is not running) with Ctrl-C ignored: a terminal's
    Ctrl-C reaches the whole process group, and the server would otherwise print a
    KeyboardInterrupt traceback from its imports before the caller's own clean line.
    The server sets its own handling once its imports are done, and the workers
    ignore Ctrl-C anyway (:func:`_worker`): the caller ends them."""
    import multiprocessing.forkserver

    if threading.current_thread() is not threading.main_thread():
        multiprocessing.forkserver.ensure_running()  # signals belong to the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the server
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def samples(
    recipe: Recipe, family: PDEFamily, seed: int, indices: range, workers: int, scheduler
) -> Iterator[dict[str, np.ndarray]]:
    """The samples of ``indices``, in order, computed locally or on a cluster."""
    if scheduler is not None:
        yield from _on_cluster(recipe, seed, indices, scheduler)
    elif workers == 1:
        for index in indices:
            yield _compute(family, seed, index)
    else:
        yield from _on_workers(recipe, seed, indices, workers)


def _on_workers(
    recipe: Recipe, seed: int, indices: range, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """The samples of ``indices``, in order, from local worker processes, each with
    a pipe of its own (why: the module's docstring)."""
    context = _pool_context()
    connections: list[multiprocessing.connection.Connection] = []
    processes = {}  # connection -> its worker
    # Workers read these when they start (from a forkserver: when the server starts,
    # with the process's first workers, and it keeps them); then the caller's again.
    saved = {name: os.environ.get(name) for name in _worker_env()}
    os.environ.update(_worker_env())
    finished = False
    try:
        if context.get_start_method() == "forkserver":
            _start_forkserver()
        for _ in range(min(workers, len(indices))):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(recipe, theirs), daemon=True)
            process.start()
            theirs.close()
            connections.append(ours)
            processes[ours] = process
        _restore(saved)
        sentinels = {process.sentinel: process for process in processes.values()}
        in_flight = {connection: 0 for connection in connections}
        done: dict[int, dict | SampleFailed] = {}
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
            if isinstance(result, SampleFailed):
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


def _died(process: multiprocessing.process.BaseProcess) -> WorkerDied:
    """The error for a worker that has ended (or whose pipe has), saying how it ended."""
    process.join(1.0)  # its pipe can close a moment before its exit status is known
    code = process.exitcode
    if code is None:
        return WorkerDied("its pipe closed")
    if code < 0:
        return WorkerDied(f"killed by {signal.Signals(-code).name}")
    return WorkerDied(f"exit status {code}")


def _on_cluster(recipe: Recipe, seed: int, indices: range, scheduler: str):
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
