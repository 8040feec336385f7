"""Training on several processes (torchrun, DDP): samples per second, and each step
split into compute and gradient all-reduce.

The quick start's model (FNO, 12 x 12 modes, 32 channels, on the 33 x 33 grid of a
33 x 33 P1 Darcy mesh; ``--resolution`` changes both, ``--pde`` the data), trained with the
Trainer's step (each process its share of the global batch, its loss weighted by
it) for ``--steps`` timed steps after two warm-up steps, on 1 process and on
``--processes`` processes, each with ``--threads`` PyTorch threads (one process is
also run with all of them, what a user without torchrun gets). Per configuration:

- ``step``: median wall time of a full DDP step (forward, backward with the
  all-reduce DDP overlaps with it, optimiser);
- ``compute``: the same step under ``DistributedDataParallel.no_sync()``, no
  all-reduce (the local gradients step the optimiser: timing only);
- ``all-reduce``: median time of one ``all_reduce`` of a tensor as large as the
  model's gradients, alone;
- samples per second: the global batch over ``step``;
- memory: the peak resident size process 0 added from its first step on (CUDA:
  peak allocated).

With ``--experts K`` the model is the FNO under an MoEConstraint of K experts, and a
last configuration shares out the experts instead of the batch
(``Trainer(parallel="experts")``: every process the whole batch).

Each configuration runs in its own ``torchrun`` (gloo on the CPU, NCCL on CUDA).

    python benchmarks/distributed_training.py --processes 2 --threads 1
    python benchmarks/distributed_training.py --resolution 65 --experts 16 --batch 8 --steps 5
    python benchmarks/distributed_training.py --pde nonlinear_diffusion --experts 16 \
        --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

_INPUT = {"darcy": "a", "nonlinear_diffusion": "f"}


def _model(space, resolution: int, experts: int, pde: str):
    """The FNO, with ``experts > 0`` under an MoEConstraint of that many experts
    (16 basis fields, the two-level Galerkin default: METIS, overlap 2, 3 sweeps)."""
    from fenop.operators import FNO, FEOperator
    from fenop.train.physics import build_constraint, constraint_table

    constraint, n_basis = None, 0
    if experts:
        n_basis = 16
        table = {"pde": pde, "inputs": [_INPUT[pde]], "n_basis": n_basis, "experts": experts}
        table.update(smoothing=0, coarse_grid=0)  # the experts' solves alone, as measured
        constraint = build_constraint(constraint_table(table), space)
    processor = FNO(4, 1 + n_basis, n_modes=(12, 12), hidden_channels=32)
    return FEOperator(
        space,
        space,
        processor,
        resolution=resolution,
        constraint=constraint,
        constraint_inputs=[_INPUT[pde]],
    )


def _worker(args) -> dict:
    """One configuration, on every process torchrun started; rank 0's figures."""
    from fenop.data import FieldDataset
    from fenop.fem import RelativeL2Loss
    from fenop.train.distributed import batch_share, setup

    torch.set_num_threads(args.threads)
    rank, world, device = setup(torch.device(args.device))
    data = FieldDataset(args.store, [_INPUT[args.pde]], indices=range(args.batch * 4))
    torch.manual_seed(0)
    model = _model(data.space, args.resolution, args.experts, args.pde).to(device)
    network = model
    sharded = world > 1 and args.parallel == "experts"
    if sharded:  # every process the whole batch, its share of the experts
        model.constraint.shard(rank, world)
    elif world > 1:
        network = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    loss_fn = RelativeL2Loss(data.space).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    samples = [data[i] for i in range(len(data))]

    def step(index: int, sync: bool) -> float:
        batch = list(range(index * args.batch, (index + 1) * args.batch))
        batch = [i % len(samples) for i in batch]
        mine, weight = (batch, 1.0) if sharded else batch_share(batch, rank=rank, world=world)
        x = torch.stack([samples[i][0] for i in mine]).to(device)
        y = torch.stack([samples[i][1] for i in mine]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        data_parallel = world > 1 and not sharded
        context = network.no_sync() if data_parallel and not sync else contextlib.nullcontext()
        with context:
            loss = loss_fn(network(x), y) * (weight if world > 1 else 1.0)
            loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    before = _peak_memory(device)
    for index in range(2):
        step(index, True)
    full = [step(i, True) for i in range(args.steps)]
    compute = [step(i, False) for i in range(args.steps)] if not sharded else [math.nan]
    values = sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())
    reduce_times = []
    if world > 1 and not sharded:
        flat = torch.zeros(values, device=device)
        for _ in range(args.steps + 2):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reduce_times.append(time.perf_counter() - start)
        reduce_times = reduce_times[2:]
    return {
        "processes": world,
        "threads": args.threads,
        "step": statistics.median(full),
        "compute": statistics.median(compute),
        "all_reduce": statistics.median(reduce_times) if reduce_times else math.nan,
        "gradient_mb": values * 4 / 1e6,
        "memory_mb": (_peak_memory(device) - before) / 1e6,
        "rank": rank,
    }


def _peak_memory(device: torch.device) -> float:
    """Bytes: this process's peak resident size (CUDA: peak allocated)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args, processes: int, threads: int, parallel: str = "data") -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{_free_port()}"]
    command += [__file__, "_worker", f"--store={args.store}", f"--threads={threads}"]
    command += [f"--batch={args.batch}", f"--steps={args.steps}", f"--device={args.device}"]
    command += [f"--resolution={args.resolution}", f"--experts={args.experts}"]
    command += [f"--parallel={parallel}", f"--pde={args.pde}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return next(row for row in rows if row["rank"] == 0)


def _cell(value: float, digits: int) -> str:
    """A table cell: ``-`` where a figure does not apply (NaN)."""
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="compare", choices=["compare", "_worker"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per process")
    parser.add_argument("--batch", type=int, default=20, help="the global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=33, help="mesh vertices a side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument(
        "--experts", type=int, default=0, help="K > 0: the FNO under an MoEConstraint"
    )
    parser.add_argument("--parallel", default="data", choices=["data", "experts"])
    parser.add_argument("--pde", default="darcy", choices=sorted(_INPUT))
    args = parser.parse_args(argv)
    if args.command == "_worker":
        row = _worker(args)
        if row["rank"] == 0:  # one line: the processes' output shares one pipe
            print(json.dumps(row), flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return row

    from fenop.data import generate
    from fenop.fem import unit_square

    with tempfile.TemporaryDirectory() as folder:
        if args.store is None:
            args.store = generate(
                args.pde,
                args.batch * 4,
                unit_square(args.resolution),
                seed=0,
                path=Path(folder) / "data.h5",
                progress=False,
            )
        configurations = [(1, args.threads), (1, args.threads * args.processes)]
        configurations.append((args.processes, args.threads))
        results = {}
        for processes, threads in dict.fromkeys(configurations):
            results[(processes, threads, "data")] = _run(args, processes, threads)
        if args.experts:  # the constrained model: its experts shared out instead
            key = (args.processes, args.threads, "experts")
            results[key] = _run(args, args.processes, args.threads, "experts")
    model = "FNO 12 modes 32 channels" + (f", MoE K={args.experts}" if args.experts else "")
    print(
        f"{args.pde} {args.resolution} x {args.resolution} P1, {model}, global batch "
        f"{args.batch}, {args.device}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    base = results[(1, args.threads, "data")]
    print(
        "| processes x threads | parallel | step s | compute s | all-reduce s | samples/s "
        "| speed-up | memory MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (processes, threads, parallel), row in results.items():
        rate = args.batch / row["step"]
        compute, reduce = (
            _cell(row[k], digits) for k, digits in (("compute", 3), ("all_reduce", 4))
        )
        print(
            f"| {processes} x {threads} | {parallel} | {row['step']:.3f} | {compute} | {reduce} "
            f"| {rate:.1f} | {base['step'] / row['step']:.2f} | {row['memory_mb']:.0f} |"
        )
    print(f"gradient volume per step: {base['gradient_mb']:.1f} MB (float32)")
    return {f"{p}x{t}" + ("" if m == "data" else " experts"): r for (p, t, m), r in results.items()}


if __name__ == "__main__":
    main()
