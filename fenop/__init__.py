"""fenop: neural operators on finite-element meshes.

:mod:`fenop.fem` (meshes, spaces, encoders, decoders, norms), :mod:`fenop.data`
(PDE families, generation, the HDF5 store, datasets), :mod:`fenop.operators`
(FNO, MgNO, LSM, FEMultigrid, FEOperator), :mod:`fenop.train` (Trainer,
checkpoints). Tensor layouts are described once, in :mod:`fenop._types`.
"""

from importlib.metadata import PackageNotFoundError, version

from fenop import data, fem, operators, train

try:
    __version__ = version("fenop")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "data", "fem", "operators", "train"]
