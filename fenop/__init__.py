"""fenop: neural operators on finite-element meshes.

The finite-element layer is :mod:`fenop.fem`; tensor layouts are described in
:mod:`fenop._types`.
"""

from importlib.metadata import PackageNotFoundError, version

from fenop import data, fem, operators

try:
    __version__ = version("fenop")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "data", "fem", "operators"]
