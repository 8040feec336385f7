"""Cost of the FE wrapping: an FNO training step alone and inside GridEncoder + FEDecoder.

Both variants run interleaved in one process, so machine noise hits them alike;
the figure of merit is the median over rounds of (wrapped step time / bare step
time). A step is forward + loss + backward + optimiser step.

    python benchmarks/fem_overhead.py                 # the recorded configuration
    python benchmarks/fem_overhead.py --rounds 3      # quicker, noisier
    python benchmarks/fem_overhead.py --profile       # also where a wrapped step spends time
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from neuralop.models import FNO

from fenop.fem import FEDecoder, FunctionSpace, GridEncoder, RelativeL2Loss, unit_square


def _step_timer(model, loss_fn, x, y):
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()

    return step


def _time(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64, help="grid and mesh vertices a side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler's table of a wrapped step"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.resolution

    space = FunctionSpace(unit_square(n), dirichlet="boundary")
    encoder = GridEncoder(space, n)
    decoder = FEDecoder(space, n)
    fno_options = dict(n_modes=(16, 16), hidden_channels=32, out_channels=1)

    # Bare: neuralop's FNO as users build it (with its own grid embedding), on grid
    # tensors, MSE loss; and, stricter, the same FNO without any positional input.
    bare = FNO(in_channels=1, **fno_options).to(device)
    bare_plain = FNO(in_channels=1, positional_embedding=None, **fno_options).to(device)
    x_grid = torch.randn(args.batch, 1, n, n, device=device)
    y_grid = torch.randn(args.batch, 1, n, n, device=device)
    mse = torch.nn.functional.mse_loss

    # Wrapped: FE coefficients in and out; the encoder supplies mask and coordinates.
    inner = FNO(in_channels=encoder.out_channels(1), positional_embedding=None, **fno_options)
    wrapped = torch.nn.Sequential(encoder, inner, decoder).to(device)
    x_fe = torch.randn(args.batch, 1, space.n_dofs, device=device)
    y_fe = torch.randn(args.batch, 1, space.n_dofs, device=device)
    fe_loss = RelativeL2Loss(space).to(device)

    variants = {
        "bare FNO, MSE": _step_timer(bare, mse, x_grid, y_grid),
        "bare FNO no embedding, MSE": _step_timer(bare_plain, mse, x_grid, y_grid),
        "wrapped, MSE": _step_timer(wrapped, mse, x_fe, y_fe),
        "wrapped, FE relative L2": _step_timer(wrapped, fe_loss, x_fe, y_fe),
    }
    for step in variants.values():  # warm-up: allocator, kernels, FFT plans
        _time(step, 2, device)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            times[name].append(_time(step, args.steps, device))

    base = times["bare FNO, MSE"]
    print(
        f"fem_overhead: FNO(n_modes=(16, 16), hidden_channels=32), grid {n}x{n}, "
        f"P1 mesh {n}x{n} ({space.n_dofs} DOFs), batch {args.batch}, {args.rounds} rounds "
        f"x {args.steps} steps, device {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"{'variant':<28} {'median step (ms)':>17} {'ratio to bare':>14}")
    results = {}
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        results[name] = {"median_ms": 1e3 * statistics.median(ts), "ratio": ratio}
        print(f"{name:<28} {results[name]['median_ms']:>17.1f} {ratio:>14.3f}")
    if args.profile:
        _profile(variants["wrapped, FE relative L2"], device)
    return results


def _profile(step, device: torch.device) -> None:
    """The operations of a few steps, most expensive first (device time on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        _time(step, 3, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
