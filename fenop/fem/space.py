"""FunctionSpace: a scikit-fem basis plus the torch-ready operators built on it.

>>> from fenop.fem.mesh import unit_square
>>> space = FunctionSpace(unit_square(5), degree=2, dirichlet="boundary")
>>> space
FunctionSpace(P2 on MeshTri1, 81 DOFs, 32 Dirichlet)
>>> u = space.interpolate(lambda x: x[0] * x[1])           # (n_dofs,) float64
>>> space.evaluate(u, np.array([[0.5, 0.25]]))              # exact for quadratics
tensor([0.1250], dtype=torch.float64)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import cached_property

import numpy as np
import scipy.sparse
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.fem.locate import PointLocator
from fenop.fem.sparse import SparseMatrix, to_torch_csr

# (mesh type, degree) -> (element name used in stores and checkpoints, scikit-fem element)
_ELEMENTS: dict[tuple[type, int], tuple[str, type]] = {
    (skfem.MeshLine1, 1): ("P1", skfem.ElementLineP1),
    (skfem.MeshLine1, 2): ("P2", skfem.ElementLineP2),
    (skfem.MeshTri1, 1): ("P1", skfem.ElementTriP1),
    (skfem.MeshTri1, 2): ("P2", skfem.ElementTriP2),
    (skfem.MeshQuad1, 1): ("Q1", skfem.ElementQuad1),
    (skfem.MeshQuad1, 2): ("Q2", skfem.ElementQuad2),
    (skfem.MeshTet1, 1): ("P1", skfem.ElementTetP1),
    (skfem.MeshTet1, 2): ("P2", skfem.ElementTetP2),
}

_CACHED_POINT_SETS = 8


@skfem.BilinearForm
def _mass_form(u, v, _):
    return u * v


@skfem.BilinearForm
def _stiffness_form(u, v, _):
    return dot(grad(u), grad(v))


class FunctionSpace:
    """Lagrange finite elements of a given degree on a scikit-fem mesh.

    Supported: P1/P2 on intervals, triangles and tetrahedra; Q1/Q2 on
    quadrilaterals. DOFs are point values at :attr:`dof_points`.

    Args:
        mesh: a first-order scikit-fem mesh (see :mod:`fenop.fem.mesh`).
        degree: polynomial degree, 1 or 2.
        dirichlet: which boundary DOFs carry Dirichlet conditions: ``None`` (none),
            ``"boundary"`` (the whole boundary), or a callable that receives the
            midpoints of the boundary facets ``x`` of shape ``(dim, n_facets)`` and
            returns a boolean array ``(n_facets,)`` selecting facets.

    Attributes:
        mesh: the mesh.
        degree: the polynomial degree.
        element: the element's name, ``"P1"``, ``"P2"``, ``"Q1"`` or ``"Q2"``.
        basis: the scikit-fem ``CellBasis``.
        n_dofs: number of DOFs.
        dim: spatial dimension.
        dof_points: ``(n_dofs, dim)`` float64 coordinates of the DOFs.
        boundary_dofs: ``(n_boundary,)`` int64 sorted indices of the Dirichlet DOFs.
    """

    def __init__(
        self,
        mesh: skfem.Mesh,
        degree: int = 1,
        dirichlet: str | Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if not isinstance(mesh, skfem.Mesh):
            raise TypeError(f"`mesh` must be a scikit-fem Mesh, got {type(mesh).__name__}")
        key = (type(mesh), degree)
        if key not in _ELEMENTS:
            supported = ", ".join(f"{m.__name__} degree {d}" for m, d in _ELEMENTS)
            raise ValueError(
                f"no element for {type(mesh).__name__} with degree {degree!r}; "
                f"supported: {supported}"
            )
        self.mesh = mesh
        self.degree = degree
        self.element, element_type = _ELEMENTS[key]
        self.basis = skfem.Basis(mesh, element_type())
        self.n_dofs = int(self.basis.N)
        self.dim = int(mesh.dim())
        self.dof_points = np.ascontiguousarray(self.basis.doflocs.T, dtype=np.float64)
        self.dirichlet = dirichlet
        self.boundary_dofs = self._select_boundary_dofs(dirichlet)
        self._evaluation_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _select_boundary_dofs(self, dirichlet) -> np.ndarray:
        if dirichlet is None:
            return np.zeros(0, dtype=np.int64)
        facets = self.mesh.boundary_facets()
        if isinstance(dirichlet, str):
            if dirichlet != "boundary":
                raise ValueError(
                    f'`dirichlet` must be None, "boundary" or a callable, got {dirichlet!r}'
                )
        elif callable(dirichlet):
            midpoints = self.mesh.p[:, self.mesh.facets[:, facets]].mean(axis=1)
            chosen = np.asarray(dirichlet(midpoints))
            if chosen.shape != (len(facets),) or chosen.dtype != np.bool_:
                raise ValueError(
                    f"the `dirichlet` callable must return a boolean array of shape "
                    f"({len(facets)},) for {len(facets)} boundary facets, got "
                    f"{chosen.dtype} array of shape {chosen.shape}"
                )
            facets = facets[chosen]
        else:
            raise TypeError(
                '`dirichlet` must be None, "boundary" or a callable, '
                f"got {type(dirichlet).__name__}"
            )
        return np.unique(self.basis.get_dofs(facets).all()).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"FunctionSpace({self.element} on {type(self.mesh).__name__}, "
            f"{self.n_dofs} DOFs, {len(self.boundary_dofs)} Dirichlet)"
        )

    # -- checks ---------------------------------------------------------------------

    def check_coefficients(self, coeffs: torch.Tensor, name: str = "coeffs") -> None:
        """Raise unless ``coeffs`` is a floating tensor ``(..., n_dofs)`` of this space."""
        if not isinstance(coeffs, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(coeffs).__name__}")
        if not coeffs.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {coeffs.dtype}")
        if coeffs.ndim == 0 or coeffs.shape[-1] != self.n_dofs:
            raise ValueError(
                f"`{name}` must have {self.n_dofs} DOFs in its last dimension for {self!r}, "
                f"got shape {tuple(coeffs.shape)}"
            )

    def same_dofs(self, other: FunctionSpace) -> bool:
        """Whether ``other`` has the same DOFs at the same points in the same order, so
        that coefficients of one are coefficients of the other (to 1e-10 of the mesh's
        size: the same mesh written to a file and read back)."""
        if self.n_dofs != other.n_dofs or self.dim != other.dim:
            return False
        size = float(np.ptp(self.dof_points, axis=0).max()) if self.n_dofs else 1.0
        return bool(np.abs(self.dof_points - other.dof_points).max() <= 1e-10 * size)

    # -- functions on the space -----------------------------------------------------

    def interpolate(self, f: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
        """Nodal interpolant of ``f``.

        Args:
            f: receives the DOF coordinates ``x`` of shape ``(dim, n_dofs)`` and
                returns values ``(..., n_dofs)``.

        Returns:
            float64 tensor ``(..., n_dofs)``.
        """
        values = np.asarray(f(self.dof_points.T.copy()), dtype=np.float64)
        if values.ndim == 0:
            values = np.full(self.n_dofs, float(values))
        if values.shape[-1] != self.n_dofs:
            raise ValueError(
                f"`f` must return values of shape (..., {self.n_dofs}), got {values.shape}"
            )
        return torch.from_numpy(values.copy())

    @cached_property
    def locator(self) -> PointLocator:
        """The :class:`~fenop.fem.locate.PointLocator` of this space's mesh."""
        return PointLocator(self.mesh)

    def evaluation_matrix(
        self, points: np.ndarray, *, padding: float = 0.0
    ) -> tuple[scipy.sparse.csr_array, np.ndarray]:
        """The sparse matrix mapping coefficients to values at ``points``.

        Row ``i`` holds the basis functions of the cell containing point ``i``
        evaluated there, as scikit-fem's ``Basis.probes`` builds them; rows of
        points outside the mesh are zero.

        Args:
            points: ``(n_points, dim)`` coordinates.
            padding: points outside the mesh by at most this fraction of a cell's
                size take the value extrapolated from the cell they are least
                outside of (its polynomials, evaluated there) and count as inside
                (:class:`~fenop.fem.locate.PointLocator`).

        Returns:
            The matrix ``(n_points, n_dofs)`` and a boolean mask ``(n_points,)`` of
            the points that lie in the mesh.
        """
        points = np.asarray(points, dtype=np.float64)
        cells = self.locator(points, padding=padding)
        inside = cells >= 0
        rows = np.nonzero(inside)[0]
        cells = cells[inside]
        x = points[inside].T
        basis = self.basis
        reference = basis.mapping.invF(x[:, :, np.newaxis], tind=cells)
        values = np.stack(
            [
                np.asarray(basis.elem.gbasis(basis.mapping, reference, k, tind=cells)[0])[:, 0]
                for k in range(basis.Nbfun)
            ]
        )  # (n_basis_functions, n_inside)
        columns = basis.element_dofs[:, cells]
        matrix = scipy.sparse.csr_array(
            (values.ravel(), (np.tile(rows, basis.Nbfun), columns.ravel())),
            shape=(len(points), self.n_dofs),
        )
        return matrix, inside

    def evaluate(self, coeffs: torch.Tensor, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Values of FE functions at arbitrary points, differentiable in ``coeffs``.

        The evaluation matrix of a point set is built once and cached (for the
        last few point sets used) on ``coeffs``' device.

        Args:
            coeffs: ``(..., n_dofs)`` coefficients; any leading (batch, channel) dims.
            points: ``(n_points, dim)`` coordinates inside the mesh.

        Returns:
            ``(..., n_points)`` values, on ``coeffs``' device and dtype.

        Raises:
            ValueError: some points lie outside the mesh (the message says how many).
        """
        self.check_coefficients(coeffs)
        if isinstance(points, torch.Tensor):
            points = points.detach().cpu().numpy()
        points = np.ascontiguousarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"`points` must have shape (n_points, {self.dim}), got {points.shape}")
        key = (points.shape, hash(points.tobytes()), str(coeffs.device))
        matrix = self._evaluation_cache.get(key)
        if matrix is None:
            scipy_matrix, inside = self.evaluation_matrix(points)
            if not inside.all():
                first = points[np.argmin(inside)]
                raise ValueError(
                    f"{int((~inside).sum())} of {len(points)} points lie outside the mesh "
                    f"(first: {tuple(first.tolist())})"
                )
            matrix = SparseMatrix(scipy_matrix).to(coeffs.device)
            self._evaluation_cache[key] = matrix
            if len(self._evaluation_cache) > _CACHED_POINT_SETS:
                self._evaluation_cache.popitem(last=False)
        else:
            self._evaluation_cache.move_to_end(key)
        return matrix(coeffs)

    # -- FE matrices ------------------------------------------------------------------

    @cached_property
    def mass_matrix(self) -> scipy.sparse.csr_array:
        """The mass matrix ``M_ij = ∫ φ_i φ_j`` as SciPy CSR ``(n_dofs, n_dofs)`` (CPU solvers)."""
        return scipy.sparse.csr_array(_mass_form.assemble(self.basis))

    @cached_property
    def stiffness_matrix(self) -> scipy.sparse.csr_array:
        """The stiffness matrix ``K_ij = ∫ ∇φ_i · ∇φ_j`` as SciPy CSR ``(n_dofs, n_dofs)``."""
        return scipy.sparse.csr_array(_stiffness_form.assemble(self.basis))

    @cached_property
    def mass(self) -> torch.Tensor:
        """:attr:`mass_matrix` as a float64 torch CSR tensor ``(n_dofs, n_dofs)``."""
        return to_torch_csr(self.mass_matrix)

    @cached_property
    def stiffness(self) -> torch.Tensor:
        """:attr:`stiffness_matrix` as a float64 torch CSR tensor ``(n_dofs, n_dofs)``."""
        return to_torch_csr(self.stiffness_matrix)
