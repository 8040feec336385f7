"""The ``fenop`` command's arguments: the parser and the types it reads them with.

Building the parser imports neither torch nor scikit-fem, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import json

EXIT_BAD_INPUT = 2
# The choices `generate` offers, named here so that building the parser imports
# neither torch nor scikit-fem (tests check them against fenop.data.pdes.PDES and
# fenop.fem.mesh.DOMAINS).
PDE_NAMES = (
    "advection_diffusion",
    "allen_cahn",
    "darcy",
    "heat",
    "nonlinear_diffusion",
    "poisson",
)
DOMAIN_NAMES = ("square", "lshape")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: same one-line form, status 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """argparse's help, with each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        meaningful = not (default is None or default is False or default == [])
        if (
            "%(default)" not in text
            and action.option_strings
            and meaningful
            and default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


def _option(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON when it parses (numbers, lists), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _at_least(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            wanted = "a positive integer" if low == 1 else f"an integer of at least {low}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = "integer"  # what argparse names in its messages
    return parse


_positive_int = _at_least(1)


def _positive_float(text: str) -> float:
    """An argparse type: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_positive_float.__name__ = "number"


def _samples(text: str) -> slice:
    """``START:STOP`` (either may be left out) as a slice of sample indices."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = [int(v) if v else None for v in (start, stop)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}") from None
    if any(b is not None and b < 0 for b in bounds):
        raise argparse.ArgumentTypeError(f"expected non-negative sample numbers, got {text!r}")
    return slice(*bounds)


def build_parser() -> argparse.ArgumentParser:
    from fenop import __version__

    parser = _Parser(
        prog="fenop",
        description="Neural operators on finite-element meshes.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"fenop {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    def command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, formatter_class=_Help, **options)

    def threads(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--threads",
            type=_positive_int,
            help="PyTorch threads (default: PyTorch's, OMP_NUM_THREADS where set)",
        )

    gen = command("generate", help="solve PDE samples into an HDF5 store")
    gen.add_argument("pde", choices=PDE_NAMES, help="PDE family")
    gen.add_argument(
        "-n", "--n-samples", type=_positive_int, required=True, help="number of samples"
    )
    gen.add_argument("-o", "--output", required=True, help="HDF5 file to write (or resume)")
    gen.add_argument(
        "--seed", type=_at_least(0), default=0, help="sample i depends on (seed, i) only"
    )
    gen.add_argument(
        "--resolution", type=_at_least(2), help="vertices per side of the built-in mesh (33)"
    )
    gen.add_argument("--domain", choices=DOMAIN_NAMES, default="square", help="built-in mesh")
    gen.add_argument("--mesh", help="a mesh file (Gmsh, VTK, XDMF) instead of a built-in mesh")
    gen.add_argument(
        "--degree", type=int, choices=(1, 2), default=1, help="Lagrange degree of the FE space"
    )
    gen.add_argument(
        "-j", "--workers", type=_positive_int, default=1, help="local worker processes"
    )
    gen.add_argument(
        "--chunk-size", type=_positive_int, default=32, help="samples written per chunk"
    )
    gen.add_argument("--scheduler", help="dask.distributed scheduler address (fenop[cluster])")
    gen.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the PDE family, e.g. a_high=10 (repeatable)",
    )
    gen.add_argument(
        "--steps",
        type=_positive_int,
        help="time-dependent families: save the initial state and this many time steps",
    )
    gen.add_argument(
        "--dt", type=_positive_float, help="with --steps: the time step (default: the family's)"
    )
    gen.add_argument("--overwrite", action="store_true", help="replace a file of another recipe")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    train = command("train", help="train a model from a TOML configuration")
    train.add_argument("config", help="TOML configuration (see examples/*.toml)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue a killed run from DIR/last (DIR defaults to the configuration's output)",
    )
    train.add_argument("--device", help="cpu or cuda (default: the configuration's, else auto)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a finished run in the output folder"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    threads(train)

    evaluate = command("evaluate", help="errors of a checkpoint on a store")
    evaluate.add_argument("checkpoint", help="checkpoint directory or shipped name")
    evaluate.add_argument("data", help="store with the model's input and output fields")
    evaluate.add_argument("--batch-size", type=_positive_int, default=32, help="samples per batch")
    evaluate.add_argument(
        "--per-sample", action="store_true", help="also list each sample's errors"
    )
    evaluate.add_argument("--plot", help="save a picture of a few samples and the training curves")
    evaluate.add_argument(
        "--animate", help="a stepper: save a GIF of the first trajectory's rollout beside the data"
    )
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument(
        "--samples", type=_samples, metavar="START:STOP", help="score these samples only"
    )
    which.add_argument("--split", choices=["test"], help="score the checkpoint's own test split")
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    threads(evaluate)

    predict = command("predict", help="run a model on the input fields of a store")
    predict.add_argument("model", help="checkpoint directory or shipped name (e.g. darcy-fno)")
    predict.add_argument(
        "input", help="store with the model's input fields (any mesh of its domain)"
    )
    predict.add_argument("-o", "--output", required=True, help="HDF5 store of the predictions")
    predict.add_argument(
        "--steps",
        type=_positive_int,
        help="a stepper: the states to predict (default: its training horizon)",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output")
    predict.add_argument("--batch-size", type=_positive_int, default=32, help="samples per batch")
    predict.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    predict.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    threads(predict)

    convert = command(
        "convert",
        help="a store to XDMF or VTU for ParaView, or a mesh file with point data to a store",
    )
    convert.add_argument("input", help="a store (.h5), or a meshio file with point data")
    convert.add_argument(
        "output",
        help=".xdmf (a step per sample, or per time of trajectories) or .vtu (a file per "
        "sample); .h5 from a mesh file",
    )
    convert.add_argument(
        "--predictions", help="a store of predictions on the same mesh: added, with errors"
    )
    convert.add_argument(
        "--samples", type=_samples, metavar="START:STOP", help="convert these samples only"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    info = command(
        "info", help="what a store or checkpoint holds (without one: the shipped models)"
    )
    info.add_argument(
        "file", nargs="?", help="an HDF5 store, a checkpoint directory or a shipped model's name"
    )
    return parser
