"""The ``fenop`` command.

    fenop generate darcy -n 1000 --resolution 85 --seed 0 -o darcy.h5 [-j 2]
    fenop train CONFIG.toml [--resume | --overwrite] [--device cpu|cuda]
    fenop evaluate CHECKPOINT DATA.h5 [--samples START:STOP | --split test]
    fenop predict CHECKPOINT INPUT.h5 -o OUTPUT.h5 [--overwrite]
    fenop info [FILE]
    fenop convert STORE.h5 OUT.xdmf|OUT.vtu [--predictions PRED.h5] [--samples START:STOP]
    fenop convert MESH.xdmf|MESH.vtu|... STORE.h5

``--threads N`` (train, evaluate, predict) sets PyTorch's threads. The arguments
are read by :mod:`fenop._cli_parser`; this module runs the commands.

Bad input ends with one line on stderr naming the file and the problem, and exit
status 2; a training run that diverges, one line and status 1. No output file is
left half-written, whether a command fails, is interrupted (Ctrl-C, status 130) or
terminated (SIGTERM, status 143); an interrupted generation keeps its complete
chunks on purpose, and the same command resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from fenop._allocator import keep_freed_memory
from fenop._cli_parser import EXIT_BAD_INPUT, build_parser

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a tool its reader left


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or a supervisor's stop), raised like Ctrl-C where the
    program is, so that what it was writing is cleaned up or kept resumable as after
    Ctrl-C; the exit status is SIGTERM's."""


def _terminate(signum, frame):
    raise _Terminated


def _interrupted(exc: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED


def _test_split(checkpoint: str) -> slice:
    """The test samples of the run that wrote ``checkpoint`` (its data description)."""
    from fenop.train import CheckpointError, checkpoint_path, read_config

    folder = checkpoint_path(checkpoint)
    data = read_config(folder).get("data", {})
    if "n_train" not in data or "n_test" not in data:
        raise CheckpointError(folder, "records no training data split (n_train, n_test)")
    return slice(data["n_train"], data["n_train"] + data["n_test"])


def _picture(path: Path) -> Path:
    """``path``, or an InputError naming it when a picture cannot be saved there:
    its folder is missing or not writable, it is a folder, or its suffix names no
    format matplotlib writes. Checked before the work whose picture it is."""
    from fenop._checks import missing_folder
    from fenop._errors import InputError
    from fenop.train.plots import plot_format_problem

    problem = missing_folder(path) or plot_format_problem(path)
    if problem is None and path.is_dir():
        problem = "is a folder; name a picture file"
    if problem is None and not os.access(path.parent, os.W_OK):
        problem = f"cannot be written, folder {path.parent} is not writable"
    if problem:
        raise InputError(f"{path}: {problem}")
    return path


def _mesh(args):
    from fenop.fem import load_mesh
    from fenop.fem.mesh import DOMAINS

    if args.mesh is not None:
        if args.resolution is not None:
            from fenop._errors import InputError

            raise InputError("give either --mesh or --resolution, not both")
        return load_mesh(args.mesh)
    return DOMAINS[args.domain](33 if args.resolution is None else args.resolution)


def _already_written(output: Path, overwrite: bool) -> int:
    """Samples a store at ``output`` holds already (0 if it is new or to be replaced;
    whether its recipe is this command's is generate()'s to check)."""
    from fenop.data import StoreError, read_header

    if overwrite or not output.is_file():
        return 0
    try:
        return int(read_header(output)["n_complete"])
    except (StoreError, KeyError, ValueError):
        return 0


def _time_steps(args) -> dict:
    """The family options that ``--steps`` and ``--dt`` stand for: a trajectory of
    ``steps`` steps of size ``dt`` (``t_final = steps * dt``)."""
    import inspect

    from fenop._errors import InputError
    from fenop.data.pdes import get_pde

    if args.steps is None:
        if args.dt is not None:
            raise InputError("--dt is the step of a trajectory: give --steps with it")
        return {}
    if "n_steps" not in inspect.signature(get_pde(args.pde)).parameters:
        raise InputError(f"{args.pde} has no time axis: --steps is for time-dependent families")
    clash = sorted({"n_steps", "t_final", "trajectory"} & {k for k, _ in args.option})
    if clash:
        raise InputError(f"--steps sets {', '.join(clash)}: leave the --option out")
    options = {"n_steps": args.steps, "trajectory": True}
    if args.dt is not None:
        options["t_final"] = args.steps * args.dt
    return options


def _generate(args) -> int:
    from fenop.data import SampleError, WorkerDiedError, generate, read_header

    output = Path(args.output)  # generate() checks that it can be written
    options = {**dict(args.option), **_time_steps(args)}
    mesh = _mesh(args)
    before = _already_written(output, args.overwrite)
    if 0 < before < args.n_samples and not args.quiet:
        print(f"resuming {output}: {before} of {args.n_samples} samples there", file=sys.stderr)
    try:
        generate(
            args.pde,
            args.n_samples,
            mesh,
            seed=args.seed,
            path=output,
            degree=args.degree,
            workers=args.workers,
            chunk_size=args.chunk_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
            scheduler=args.scheduler,
            **options,
        )
    except KeyboardInterrupt as exc:
        if output.exists():
            done = read_header(output)["n_complete"]
            print(
                f"fenop: interrupted: {output} keeps {done} of {args.n_samples} samples; "
                "run the same command to resume",
                file=sys.stderr,
            )
        return _interrupted(exc)
    except (WorkerDiedError, SampleError) as exc:
        print(f"fenop generate: error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        if before >= args.n_samples:
            print(f"{output} holds all {args.n_samples} {args.pde} samples already; nothing to do")
        elif before:
            written = args.n_samples - before
            print(f"wrote {written} {args.pde} samples to {output} ({args.n_samples} in all)")
        else:
            print(f"wrote {args.n_samples} {args.pde} samples to {output}")
    return 0


def _train(args) -> int:
    from fenop.train import saved_epoch
    from fenop.train.config import read_config
    from fenop.train.run import train_from_config

    output = args.resume if isinstance(args.resume, str) else None
    try:
        history = train_from_config(
            args.config,
            resume=bool(args.resume),
            output=output,
            device=args.device,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt as exc:
        folder = Path(output or read_config(args.config)["training"]["output"])
        epoch = saved_epoch(folder)
        if epoch is not None:
            print(
                f"fenop train: interrupted: {folder / 'last'} holds epoch {epoch}; "
                f"`fenop train {args.config} --resume` continues from there",
                file=sys.stderr,
            )
        else:
            print("fenop train: interrupted before the first epoch ended", file=sys.stderr)
        return _interrupted(exc)
    if history and not args.quiet:
        last = history[-1]
        l2, h1 = last["test_l2"], last["test_h1"]
        print(f"epoch {last['epoch']}: test relative L2 {l2:.4f}, H1 {h1:.4f}")
    elif not history:  # resumed a run that had finished
        folder = Path(output or read_config(args.config)["training"]["output"])
        epoch = saved_epoch(folder)
        print(f"{folder} finished at epoch {epoch} already; nothing to resume", file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from fenop.train import evaluate_store
    from fenop.train.trajectories import evaluate_rollouts, stepper_of

    data = Path(args.data)
    if args.plot:
        _picture(Path(args.plot))
    stepper = stepper_of(args.checkpoint) is not None
    if args.animate:
        _animation(Path(args.animate), stepper, args.checkpoint)
    samples = args.samples
    if args.split == "test":
        samples = _test_split(args.checkpoint)
    score = evaluate_rollouts if stepper else evaluate_store
    evaluation = score(
        args.checkpoint,
        data,
        samples=samples,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    for line in evaluation.summary():
        print(line)
    if stepper:
        return _report_rollouts(args, evaluation)
    if args.per_sample:
        for i, a, b in zip(evaluation.samples, evaluation.l2, evaluation.h1, strict=True):
            print(f"{i} {a:.6f} {b:.6f}")
    if args.plot:
        from fenop.train import checkpoint_path
        from fenop.train.inference import fields_of
        from fenop.train.plots import plot_predictions

        # the curves of the checkpoint's own run (a shipped model has none)
        metrics = checkpoint_path(args.checkpoint).parent / "metrics.jsonl"
        inputs, outputs = fields_of(args.checkpoint)
        shown = len(evaluation.shown[0])
        plot_predictions(
            evaluation.space,
            *evaluation.shown,
            args.plot,
            metrics=metrics,
            names=(inputs[0], outputs[0]),
            samples=evaluation.samples[:shown].tolist(),
            errors=evaluation.l2[:shown].tolist(),
        )
        print(f"wrote {args.plot}")
    return 0


def _animation(path: Path, stepper: bool, checkpoint: str) -> None:
    """Checked before the model runs: ``--animate`` is for a stepper, to a GIF."""
    from fenop._checks import missing_folder
    from fenop._errors import InputError

    if not stepper:
        raise InputError(f"--animate is for a stepper; {checkpoint} maps fields to fields")
    if path.suffix.lower() != ".gif":
        raise InputError(f"{path}: an animation is written as .gif")
    if problem := missing_folder(path):
        raise InputError(f"{path}: {problem}")


def _report_rollouts(args, evaluation) -> int:
    """The rest of ``fenop evaluate`` of a stepper: each trajectory's errors, the
    error against time, the animation."""
    from fenop.train.plots import plot_rollout_errors

    if args.per_sample:
        print("sample, then the free-running relative L2 error at each step")
        for i, errors in zip(evaluation.samples, evaluation.free_l2, strict=True):
            print(f"{i} " + " ".join(f"{e:.6f}" for e in errors))
    if args.plot:
        plot_rollout_errors(evaluation, args.plot)
        print(f"wrote {args.plot}")
    if args.animate:
        from fenop.train.plots import animate_rollout

        reference, prediction = evaluation.shown
        animate_rollout(evaluation.space, reference, prediction, evaluation.times, args.animate)
        print(f"wrote {args.animate} (trajectory {evaluation.samples[0]})")
    return 0


def _predict(args) -> int:
    from fenop.train import predict_store
    from fenop.train.inference import fields_of
    from fenop.train.trajectories import predict_rollouts, stepper_of

    if stepper_of(args.model) is not None:
        output = predict_rollouts(
            args.model,
            args.input,
            args.output,
            steps=args.steps,
            batch_size=args.batch_size,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        if not args.quiet:
            from fenop.data import read_store

            store = read_store(output)
            print(
                f"wrote {store.n_samples} rollouts of {len(store.times) - 1} steps "
                f"(t = {store.times[0]:g} to {store.times[-1]:g}) to {output}"
            )
        return 0
    if args.steps is not None:
        from fenop._errors import InputError

        raise InputError(f"--steps is for a stepper; {args.model} maps fields to fields")

    output = predict_store(
        args.model,
        args.input,
        args.output,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    from fenop.data import read_header

    header = read_header(output)
    if not args.quiet:
        _, outputs = fields_of(args.model)
        print(f"wrote {header['n_complete']} predictions of {', '.join(outputs)} to {output}")
    if header.get("constraint_failed"):  # said even with --quiet: these outputs are suspect
        print(
            f"fenop predict: warning: the hard constraint's solve failed for "
            f"{header['constraint_failed']} samples",
            file=sys.stderr,
        )
    return 0


def _convert(args) -> int:
    from fenop._errors import InputError
    from fenop.data.meshio_files import meshio_to_store, store_to_meshio

    source, target = Path(args.input), Path(args.output)
    if source.suffix == ".h5":  # a store out to ParaView's formats
        written = store_to_meshio(
            source,
            target,
            predictions=args.predictions,
            samples=args.samples,
            overwrite=args.overwrite,
        )
        if target.suffix == ".xdmf":
            print(f"wrote {written[0]} (its arrays in {written[1].name})")
        else:
            shown = written[0] if len(written) == 1 else f"{written[0]} ... {written[-1].name}"
            print(f"wrote {shown}")
        return 0
    if args.predictions is not None or args.samples is not None:
        raise InputError("--predictions and --samples are for converting a store (.h5)")
    if target.suffix != ".h5":
        raise InputError(f"{target}: a mesh file becomes a store: name an .h5 file")
    meshio_to_store(source, target, overwrite=args.overwrite)
    print(f"wrote {target}")
    return 0


def _shipped_models() -> int:
    """``fenop info`` without a file: the shipped models, one line each."""
    from fenop.train import PRETRAINED, pretrained_names, read_config

    print("shipped models (fenop info NAME for one; the model card is in its folder):")
    for name in pretrained_names():
        config = read_config(PRETRAINED / name)
        model, data = config["model"], config.get("data", {})
        constraint = model.get("constraint")
        kind = f", {constraint['kind']} {constraint['condition']} constraint" if constraint else ""
        print(
            f"  {name:<26} {data.get('pde', '?')}, {model['processor']}{kind}; "
            f"test relative L2 {config['test_error']:.4f}"
        )
    return 0


def _info(args) -> int:
    from fenop.data import read_store
    from fenop.train import checkpoint_path, pretrained_names

    if args.file is None:
        return _shipped_models()
    path = Path(args.file)
    if path.is_dir() or (not path.exists() and args.file in pretrained_names()):
        return _checkpoint_info(checkpoint_path(args.file))
    store = read_store(path, allow_partial=True)
    store.check_values(store.header["fields"])
    header, space = store.header, store.space
    mesh = space.mesh
    print(f"{path}: fenop store, format {header['fenop_format']}")
    print(f"  pde         {header.get('pde', 'not recorded')}")
    print(f"  samples     {header['n_complete']} of {header['n_samples']} complete")
    print(f"  fields      {', '.join(header['fields'])}")
    if store.trajectories:
        times = store.times
        print(
            f"  time        {len(times)} states from t = {times[0]:g} to {times[-1]:g} "
            f"(trajectories: {', '.join(store.trajectories)})"
        )
    lower, upper = mesh.p.min(axis=1).tolist(), mesh.p.max(axis=1).tolist()
    cells = f"{mesh.p.shape[1]} vertices, {mesh.t.shape[1]} cells"
    print(f"  mesh        {type(mesh).__name__}, {cells}, box {lower} to {upper}")
    dirichlet = header.get("dirichlet", "boundary")
    print(f"  space       {space.element}, {space.n_dofs} DOFs, Dirichlet: {dirichlet}")
    if "seed" in header:
        print(f"  seed        {header['seed']}")
    if "parameters" in header:
        print(f"  parameters  {json.dumps(header['parameters'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # a bare `fenop`: what it can do, not just an error
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    keep_freed_memory()  # the layers' arrays of tens of MiB, not faulted in anew each time
    if threading.current_thread() is not threading.main_thread():  # signals go to the main one
        return _run(args)
    # SIGTERM ends a command as Ctrl-C does: partial outputs removed, runs resumable.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    try:
        # Imported here, inside the handler: Ctrl-C while torch loads is a clean exit.
        from fenop._errors import InputError

        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:  # commands that leave nothing to resume: nothing to add
        print(f"fenop {args.command}: interrupted", file=sys.stderr)
        return _interrupted(exc)
    except BrokenPipeError:  # `fenop info ... | head`: the reader has gone, as with any tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_BROKEN_PIPE
    except FloatingPointError as exc:  # a diverged training run
        _error(args, exc)
        return 1
    # fenop's own errors about the user's input (a store, configuration, checkpoint,
    # mesh, device or argument), the file system's, and a missing optional package;
    # anything else is a fault of fenop's and keeps its traceback.
    except (InputError, OSError, ImportError) as exc:
        _error(args, exc)
        return EXIT_BAD_INPUT


def _error(args, exc: Exception) -> None:
    """The one line of an error, whatever a value quoted in it held (line breaks)."""
    text = " ".join(str(exc).splitlines())
    print(f"fenop {args.command}: error: {text}", file=sys.stderr)


def _checkpoint_info(path: Path) -> int:
    from fenop.train import describe_model, load_checkpoint, read_config

    config = read_config(path)
    # Loaded in full: the weights must read and fit the description, or CheckpointError.
    description = describe_model(load_checkpoint(path))
    version = config.get("fenop_version", "?")
    print(f"{path}: fenop checkpoint, format {config['format_version']}, fenop {version}")
    written = description.to_json()
    # FEMultigrid's meshes are too long to print: its hierarchy gets a line of its own.
    options = {k: v for k, v in written["options"].items() if k not in ("coarse", "spaces")}
    print(f"  processor   {description.processor} {json.dumps(options)}")
    if written["resolution"] is not None:
        print(f"  resolution  {written['resolution']}")
    if description.levels:
        _print_levels(description.levels)
    if description.constraint is not None:
        c = description.constraint
        shown = {k: v for k, v in c.items() if k not in ("parameters",) and v is not None}
        print(f"  constraint  {json.dumps(shown)}")
    space = description.space_in
    vertices = space.mesh.p.shape[1]
    print(f"  space       {space.element} on {type(space.mesh).__name__}, {vertices} vertices")
    saved = {
        "best": "best: the epoch of lowest test error",
        "last": "last: the latest epoch (with what --resume needs)",
    }
    if path.name in saved and path.parent.joinpath("metrics.jsonl").is_file():
        print(f"  saved       {saved[path.name]}")
    stepper = config.get("data", {}).get("stepper")
    if stepper is not None:
        print(
            f"  stepper     advances {stepper['state']} from its last {stepper['history']} "
            f"state(s), {stepper['bundle']} step(s) of {stepper['dt']} per call; trained on "
            f"{stepper['horizon']} steps"
        )
    for key in ("epoch", "test_error", "data"):
        if key in config:
            print(f"  {key:<11} {json.dumps(config[key])}")
    return 0


def _print_levels(levels) -> None:
    """A mesh hierarchy in one line: its meshes are too long to print."""
    from fenop.fem import is_nested

    first = levels[0]
    kind = f"{first.element} on {type(first.mesh).__name__}"
    if is_nested(levels):
        print(f"  hierarchy   {len(levels)} levels from {kind}, {first.mesh.p.shape[1]} vertices")
    else:
        vertices = ", ".join(str(s.mesh.p.shape[1]) for s in levels)
        print(f"  hierarchy   {len(levels)} levels, not nested, of {kind}: {vertices} vertices")


_COMMANDS = {
    "generate": _generate,
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "convert": _convert,
    "info": _info,
}


if __name__ == "__main__":
    sys.exit(main())
