"""The ``fenop`` command.

    fenop generate darcy -n 1000 --resolution 85 --seed 0 -o darcy.h5 [-j 2]
    fenop info FILE

Bad input ends with one line on stderr naming the file and the problem, and exit
status 2; no output file is left half-written (an interrupted generation keeps its
complete chunks on purpose, and the same command resumes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: same one-line form, status 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _option(text: str) -> tuple[str, object]:
    """``key=value``; the value is read as JSON when it parses (numbers, lists), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _mesh(args):
    from fenop.fem import l_shape, load_mesh, unit_square

    if args.mesh is not None:
        if args.resolution is not None:
            raise ValueError("give either --mesh or --resolution, not both")
        return load_mesh(args.mesh)
    resolution = 33 if args.resolution is None else args.resolution
    if args.domain == "lshape":
        return l_shape(resolution)
    return unit_square(resolution)


def _generate(args) -> int:
    from fenop.data import generate, read_header

    output = Path(args.output)
    mesh = _mesh(args)
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
            **dict(args.option),
        )
    except KeyboardInterrupt:
        if output.exists():
            done = read_header(output)["n_complete"]
            print(
                f"fenop: interrupted: {output} keeps {done} of {args.n_samples} samples; "
                "run the same command to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(f"wrote {args.n_samples} {args.pde} samples to {output}")
    return 0


def _info(args) -> int:
    from fenop.data import store_space, validate_store

    path = Path(args.file)
    header = validate_store(path, allow_partial=True)
    space = store_space(path)
    mesh = space.mesh
    print(f"{path}: fenop store, format {header['fenop_format']}")
    print(f"  pde         {header.get('pde', '?')}")
    print(f"  samples     {header['n_complete']} of {header['n_samples']} complete")
    print(f"  fields      {', '.join(header['fields'])}")
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


def build_parser() -> argparse.ArgumentParser:
    from fenop import __version__
    from fenop.data.pdes import PDES

    parser = _Parser(prog="fenop", description="Neural operators on finite-element meshes.")
    parser.add_argument("--version", action="version", version=f"fenop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="solve PDE samples into an HDF5 store")
    gen.add_argument("pde", choices=sorted(PDES), help="PDE family")
    gen.add_argument("-n", "--n-samples", type=int, required=True, help="number of samples")
    gen.add_argument("-o", "--output", required=True, help="HDF5 file to write (or resume)")
    gen.add_argument("--seed", type=int, default=0, help="sample i depends on (seed, i) only")
    gen.add_argument("--resolution", type=int, help="vertices per side of the built-in mesh (33)")
    gen.add_argument(
        "--domain", choices=["square", "lshape"], default="square", help="built-in mesh"
    )
    gen.add_argument("--mesh", help="a mesh file (Gmsh, VTK, XDMF) instead of a built-in mesh")
    gen.add_argument("--degree", type=int, default=1, help="Lagrange degree of the FE space")
    gen.add_argument("-j", "--workers", type=int, default=1, help="local worker processes")
    gen.add_argument("--chunk-size", type=int, default=32, help="samples written per chunk")
    gen.add_argument("--scheduler", help="dask.distributed scheduler address (fenop[cluster])")
    gen.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the PDE family, e.g. a_high=10 (repeatable)",
    )
    gen.add_argument("--overwrite", action="store_true", help="replace a file of another recipe")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=_generate)

    info = commands.add_parser("info", help="what a store holds")
    info.add_argument("file")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fenop.data import StoreError

    try:
        return args.run(args)
    except (StoreError, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"fenop {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
