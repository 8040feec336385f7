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

import concurrent.futures
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skfem
from tqdm.auto import tqdm

from fenop.data.pdes import PDEFamily, get_pde
from fenop.data.store import StoreError, create_store, read_header, store_space, write_samples
from fenop.fem import FunctionSpace

__all__ = ["WorkerDiedError", "generate"]


class WorkerDiedError(RuntimeError):
    """A local worker process ended before finishing its samples; the store resumes."""


# A recipe rebuilds the same PDE family in a worker process: cheap to send. Local
# workers build it once when they start; cluster workers cache it by content.
_Recipe = tuple[str, dict, int, np.ndarray, np.ndarray, str]
_worker_family: PDEFamily | None = None
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
    return family.sample(seed, index)


def _init_worker(recipe: _Recipe, caller_alive: multiprocessing.connection.Connection) -> None:
    global _worker_family
    _worker_family = _build(recipe)
    # A worker whose caller is killed would wait for tasks forever (its task queue
    # never closes): it ends itself when the caller's end of this pipe closes,
    # which happens however the caller ends.
    threading.Thread(target=_exit_when_closed, args=(caller_alive,), daemon=True).start()


def _exit_when_closed(connection: multiprocessing.connection.Connection) -> None:
    try:
        connection.recv()  # nothing is ever sent: returns only by EOFError
    except EOFError:
        pass
    os._exit(1)


def _sample_by_index(seed_index: tuple[int, int]) -> dict[str, np.ndarray]:
    return _worker_family.sample(*seed_index)


def _single_threaded_env() -> dict[str, str]:
    # Each worker owns one core: BLAS threads inside workers would oversubscribe it.
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: "1" for name in names}


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
    # Takes effect when the server starts, on the first pool of the process.
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
            yield family.sample(seed, index)
    else:
        # Workers inherit these from the forkserver, which reads them when it starts
        # (on the process's first pool) and keeps them; spawned children read them
        # on the first submit. Set for the pool's whole life, then the caller's again.
        saved = {name: os.environ.get(name) for name in _single_threaded_env()}
        os.environ.update(_single_threaded_env())
        context = _pool_context()
        alive_r, alive_w = context.Pipe(duplex=False)
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(recipe, alive_r),
        )
        try:
            yield from pool.map(_sample_by_index, ((seed, i) for i in indices), chunksize=4)
        finally:
            # On an interruption, drop queued samples instead of computing them all.
            pool.shutdown(wait=True, cancel_futures=True)
            alive_r.close()
            alive_w.close()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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
    """
    path = Path(path)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"`n_samples` must be a positive int, got {n_samples!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be a positive int, got {workers!r}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}")
    family_type = get_pde(pde)
    space = FunctionSpace(mesh, degree=degree, dirichlet="boundary")
    family = family_type(space, **options)
    expected = _describe(family, seed, n_samples)

    start = 0
    if path.exists() and not overwrite:
        start, chunk_size = _resume_from(path, family, expected)
    else:
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
                        path, start, {k: np.stack([s[k] for s in buffer]) for k in family.fields}
                    )
                    start += len(buffer)
                    buffer.clear()
        except concurrent.futures.process.BrokenProcessPool as error:
            raise WorkerDiedError(
                f"{path}: a worker process died before finishing its samples (out of "
                "memory, killed, or, from a script, generate() called outside "
                "`if __name__ == '__main__':`, which every worker runs again); the "
                f"{start} samples written are kept, and the same call resumes from there"
            ) from error
    return path
