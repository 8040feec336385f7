"""The finite-element layer: meshes and their hierarchies, spaces, sparse FE matrices,
grid encoders/decoders, interpolation, FE norms.

Set-up happens on the CPU with scikit-fem; what comes out are torch modules and
sparse tensors that move with ``.to(device)``.
"""

from fenop.fem.colouring import colour_graph
from fenop.fem.decoders import FEDecoder
from fenop.fem.encoders import GridEncoder
from fenop.fem.forms import FEForms
from fenop.fem.grid import Grid
from fenop.fem.hierarchy import hierarchy, is_nested, is_refinement
from fenop.fem.interpolation import SpaceInterpolator
from fenop.fem.locate import PointLocator, locate
from fenop.fem.mesh import l_shape, load_mesh, unit_cube, unit_interval, unit_square
from fenop.fem.normalizer import Normalizer
from fenop.fem.norms import RelativeH1Loss, RelativeL2Loss, h1_norm, l2_norm
from fenop.fem.partition import BisectionPartition, GivenPartition, MetisPartition, Partition
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix

__all__ = [
    "BisectionPartition",
    "FEDecoder",
    "FEForms",
    "FunctionSpace",
    "GivenPartition",
    "Grid",
    "GridEncoder",
    "MetisPartition",
    "Normalizer",
    "Partition",
    "PointLocator",
    "RelativeH1Loss",
    "RelativeL2Loss",
    "SpaceInterpolator",
    "SparseMatrix",
    "colour_graph",
    "h1_norm",
    "hierarchy",
    "is_nested",
    "is_refinement",
    "l2_norm",
    "l_shape",
    "load_mesh",
    "locate",
    "unit_cube",
    "unit_interval",
    "unit_square",
]
