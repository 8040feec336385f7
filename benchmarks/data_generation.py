"""Data generation: Darcy throughput and memory, and fenop's Darcy beside the peer's.

1. Throughput: `generate("darcy", N, unit_square(129), workers=W)` end to end (start-up
   of the workers and HDF5 writes included), for W = 1 and 2, each in a fresh process.
2. Memory: peak resident memory of the generating process and of its workers for N
   and 5 N samples: flat in N means samples stream to disk.
3. Worker start-up: a caller that has imported torch and neuraloperator (as
   `benchmarks/darcy.py` and training scripts have) generates 4 samples per worker
   at 17 x 17, its workers started by spawn and by fenop's forkserver, which has
   imported torch, SciPy and fenop's solvers before it forks them.
4. Statistics of fenop's Darcy at 16 x 16 vertices beside neuraloperator's
   `darcy_train_16.pt` (if present in ../shared/data/).

    python benchmarks/data_generation.py              # the recorded configuration
    python benchmarks/data_generation.py --samples 40 --skip-stats   # quick
    python benchmarks/data_generation.py --startup-only --workers 2 8  # start-up alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "data" / "darcy_train_16.pt"


class _DescendantPeak(threading.Thread):
    """Polls the peak resident set (VmHWM, Linux) of this process's descendants.

    The workers are children of fenop's forkserver, not of this process, so
    ``RUSAGE_CHILDREN`` does not see them; each keeps its own peak in VmHWM, which
    this reads until the worker exits.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib, self._done = 0, threading.Event()

    @staticmethod
    def _status(pid: str) -> dict[str, str]:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # exited meanwhile
            return {}
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def run(self):
        while not self._done.wait(0.05):
            statuses = {p.name: self._status(p.name) for p in Path("/proc").glob("[0-9]*")}
            parents = {pid: st.get("PPid", "").strip() for pid, st in statuses.items()}
            ours = {str(os.getpid())}
            for _ in range(3):  # workers are grandchildren (through the forkserver)
                ours |= {pid for pid, parent in parents.items() if parent in ours}
            for pid in ours - {str(os.getpid())}:
                high = statuses[pid].get("VmHWM", "0 kB").split()[0]
                self.peak_kib = max(self.peak_kib, int(high))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kib


def _child(n_samples: int, workers: int, resolution: int) -> None:
    """Runs in a fresh process: generate, then report time and peak memory as JSON."""
    from fenop.data import generate
    from fenop.fem import unit_square

    watcher = _DescendantPeak()
    watcher.start()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        generate(
            "darcy",
            n_samples,
            unit_square(resolution),
            seed=0,
            path=Path(folder) / "darcy.h5",
            workers=workers,
            progress=False,
        )
        seconds = time.perf_counter() - start
    peak_worker_kib = watcher.stop()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "samples_per_second": n_samples / seconds,
                # ru_maxrss is in KiB on Linux
                "peak_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_worker_mib": peak_worker_kib / 1024,
            }
        )
    )


def _run(n_samples: int, workers: int, resolution: int) -> dict:
    command = [sys.executable, __file__, "--child", str(n_samples), str(workers), str(resolution)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def throughput_and_memory(n_samples: int, resolution: int) -> None:
    print(f"Darcy on unit_square({resolution}), {n_samples} samples, end to end:")
    columns = ("workers", "samples", "seconds", "samples/s", "peak main MiB", "peak worker MiB")
    print(" ".join(f"{c:>{max(8, len(c))}}" for c in columns))
    for workers, count in ((1, n_samples), (2, n_samples), (2, 5 * n_samples)):
        r = _run(count, workers, resolution)
        print(
            f"{workers:>8} {count:>8} {r['seconds']:>8.1f} {r['samples_per_second']:>10.1f} "
            f"{r['peak_main_mib']:>13.0f} "
            + (f"{r['peak_worker_mib']:>15.0f}" if workers > 1 else f"{'-':>15}")
        )


# The caller of the start-up measurement, run as a script so that, as in a real
# training script, its module-level imports are what spawned workers re-import.
_CALLER = """\
import sys, time
import neuralop, torch
import multiprocessing
import fenop.data._workers as local_workers
from fenop.data import generate
from fenop.fem import unit_square

if __name__ == "__main__":
    method, workers, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if method == "spawn":  # else fenop's own choice, a forkserver with its preload
        context = multiprocessing.get_context("spawn")
        local_workers._pool_context = lambda: context
    start = time.perf_counter()
    generate("darcy", 4 * workers, unit_square(17), seed=0, path=path, workers=workers,
             progress=False)
    print(time.perf_counter() - start)
"""


def startup(workers_list: list[int], repeats: int = 2) -> None:
    print("Worker start-up: 4 samples per worker at 17 x 17, caller imports torch + neuralop")
    print(f"{'workers':>8} {'spawn s':>8} {'forkserver s':>13} {'ratio':>8}")
    with tempfile.TemporaryDirectory() as folder:
        caller = Path(folder) / "caller.py"
        caller.write_text(_CALLER)
        for workers in workers_list:
            best = {}
            for method in ("spawn", "forkserver") * repeats:  # interleaved, best of repeats
                path = Path(folder) / f"{method}.h5"
                path.unlink(missing_ok=True)
                out = subprocess.run(
                    [sys.executable, str(caller), method, str(workers), str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seconds = float(out.stdout.strip().splitlines()[-1])
                best[method] = min(best.get(method, np.inf), seconds)
            print(
                f"{workers:>8} {best['spawn']:>8.1f} {best['forkserver']:>13.1f} "
                f"{best['forkserver'] / best['spawn']:>8.2f}"
            )


def statistics(n_samples: int) -> None:
    import torch

    from fenop.data.pdes import Darcy
    from fenop.fem import FunctionSpace, unit_square

    space = FunctionSpace(unit_square(16), dirichlet="boundary")
    darcy = Darcy(space)
    samples = [darcy.sample(0, i) for i in range(n_samples)]
    a = np.stack([s["a"] for s in samples])
    u = np.stack([s["u"] for s in samples])
    boundary = space.boundary_dofs
    rows = [("fenop darcy (16 x 16 vertices)", u, a == darcy.a_high, np.abs(u[:, boundary]).max())]
    if PEER.is_file():
        peer = torch.load(PEER, weights_only=True)
        y, x = peer["y"].double().numpy(), peer["x"].numpy()
        edge = np.concatenate([y[:, 0], y[:, -1], y[:, :, 0], y[:, :, -1]], axis=1)
        rows.append(("peer darcy_train_16.pt", y, x, np.abs(edge).max()))
    else:
        print(f"(peer data not found at {PEER}: only fenop's statistics)")
    print(f"Darcy statistics at 16 x 16, {n_samples} fenop samples:")
    columns = ("mean u", "std u", "std/mean", "max u", "high-a fraction", "max |u| on boundary")
    print(f"{'data':<32} " + " ".join(f"{c:>{max(8, len(c))}}" for c in columns))
    for name, values, high, edge in rows:
        print(
            f"{name:<32} {values.mean():>8.4f} {values.std():>8.4f} "
            f"{values.std() / values.mean():>8.3f} {values.max():>8.4f} "
            f"{high.mean():>15.3f} {edge:>19.4f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=400, help="N (memory is also measured at 5 N)"
    )
    parser.add_argument("--resolution", type=int, default=129)
    parser.add_argument("--skip-stats", action="store_true")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2, 8], help="worker counts for the start-up"
    )
    parser.add_argument("--startup-repeats", type=int, default=2, help="best of this many")
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    if not args.startup_only:
        throughput_and_memory(args.samples, args.resolution)
    startup(args.workers, args.startup_repeats)
    if args.startup_only:
        return
    if not args.skip_stats:
        statistics(1000)


if __name__ == "__main__":
    main()
