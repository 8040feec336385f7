"""Data: Gaussian random fields, PDE families, the HDF5 store, generation, datasets."""

from fenop.data.generation import generate
from fenop.data.grf import GaussianRandomField
from fenop.data.pdes import PDES, get_pde
from fenop.data.store import StoreError, open_store, read_header, store_space, validate_store

__all__ = [
    "PDES",
    "GaussianRandomField",
    "StoreError",
    "generate",
    "get_pde",
    "open_store",
    "read_header",
    "store_space",
    "validate_store",
]
