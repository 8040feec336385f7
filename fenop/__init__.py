"""fenop: neural operators on finite-element meshes.

:mod:`fenop.fem` (meshes, spaces, encoders, decoders, norms, partitions),
:mod:`fenop.data` (PDE families, generation, the HDF5 store, datasets),
:mod:`fenop.operators` (FNO, MgNO, LSM, FEMultigrid, FEOperator, and the hard
constraints HardConstraint and MoEConstraint), :mod:`fenop.train` (model
descriptions, Trainer, checkpoints, evaluation and prediction on stores).
Tensor layouts are described once, in :mod:`fenop._types`.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fenop")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "data", "fem", "operators", "train"]


def __getattr__(name: str):
    # Subpackages load on first use: a data-generation worker then imports the FE and
    # data layers only, not neuraloperator (a second saved per worker start).
    if name in __all__[1:]:
        return importlib.import_module(f"fenop.{name}")
    raise AttributeError(f"module 'fenop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
