"""Data: Gaussian random fields, PDE families, the HDF5 store, generation, datasets
(of static fields, and of the steps of trajectories)."""

from fenop.data.dataset import FieldDataset, Normalizer
from fenop.data.generation import SampleError, WorkerDiedError, generate
from fenop.data.grf import GaussianRandomField
from fenop.data.grid_files import convert_neuralop_darcy, read_neuralop_darcy
from fenop.data.header import StoreError, read_header
from fenop.data.pdes import PDES, get_pde
from fenop.data.steps import StepDataset
from fenop.data.store import StoreInfo, open_store, read_store, store_space, validate_store

__all__ = [
    "PDES",
    "FieldDataset",
    "GaussianRandomField",
    "Normalizer",
    "SampleError",
    "StepDataset",
    "StoreError",
    "StoreInfo",
    "WorkerDiedError",
    "convert_neuralop_darcy",
    "generate",
    "get_pde",
    "open_store",
    "read_header",
    "read_neuralop_darcy",
    "read_store",
    "store_space",
    "validate_store",
]
