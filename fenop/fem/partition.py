"""Partitions of a space's DOFs into subdomains: the territories of a constraint's experts.

A :class:`Partition` gives every DOF an owner expert and every expert an
*extended* set: its owned DOFs and ``overlap`` layers of neighbours around them in
the DOF graph (DOFs that share a cell are neighbours), and its *halo*, the layer
just outside the extended set. Strategies are small objects that label the DOFs:

- :class:`MetisPartition`: METIS on the DOF graph (``pymetis``), the standard
  graph partitioner, with connected parts of balanced size;
- :class:`BisectionPartition`: recursive coordinate bisection (no dependency);
- :class:`GivenPartition`: labels the caller chose.

Each is sized by a number of experts or by DOFs per expert (so that a model moved
to a finer mesh keeps its experts' size), and is deterministic and independent
of how the DOFs are numbered.

>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9))
>>> partition = BisectionPartition(experts=4).partition(space, overlap=1)
>>> partition.n_experts, [len(d) for d in partition.owned]
(4, [20, 20, 20, 21])
>>> bool(partition.extended[0].sum() > len(partition.owned[0]))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from fenop.fem.space import FunctionSpace


class Partition:
    """An owner expert for every DOF of ``space``, and each expert's extended set and halo.

    Args:
        space: the FE space.
        labels: ``(n_dofs,)`` integers ``0 .. K - 1``, every one used: DOF i's owner.
        overlap: graph layers added around each expert's owned DOFs.

    Attributes:
        n_experts: K.
        owned: per expert, the indices of its DOFs (increasing).
        extended: ``(K, n_dofs)`` bool, the owned DOFs and ``overlap`` layers around.
        halo: ``(K, n_dofs)`` bool, the neighbours of the extended set outside it.
    """

    def __init__(self, space: FunctionSpace, labels: np.ndarray, *, overlap: int = 0):
        labels = np.asarray(labels)
        if labels.shape != (space.n_dofs,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"`labels` must be {space.n_dofs} integers (one per DOF), got "
                f"{labels.dtype} of shape {labels.shape}"
            )
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"`overlap` must be a non-negative int, got {overlap!r}")
        n_experts = int(labels.max()) + 1 if labels.size else 0
        if labels.min() < 0 or len(np.unique(labels)) != n_experts:
            raise ValueError(f"`labels` must use each of 0 .. {n_experts - 1}, got gaps")
        self.space, self.labels, self.overlap = space, labels.astype(np.int64), overlap
        self.n_experts = n_experts
        self.owned = [np.flatnonzero(labels == k) for k in range(n_experts)]
        graph = dof_graph(space)
        membership = scipy.sparse.csr_array(
            (np.ones(space.n_dofs), (labels, np.arange(space.n_dofs))),
            shape=(n_experts, space.n_dofs),
        )
        for _ in range(overlap):
            membership = scipy.sparse.csr_array((membership @ graph) > 0).astype(np.float64)
        self.extended = membership.toarray() > 0
        self.halo = ((membership @ graph).toarray() > 0) & ~self.extended

    def sizes(self) -> np.ndarray:
        """``(K,)`` DOFs owned by each expert."""
        return np.bincount(self.labels, minlength=self.n_experts)

    def __repr__(self) -> str:
        sizes = self.sizes()
        return (
            f"Partition({self.n_experts} experts of {sizes.min()}-{sizes.max()} DOFs, "
            f"overlap {self.overlap})"
        )


def dof_graph(space: FunctionSpace) -> scipy.sparse.csr_array:
    """``(n_dofs, n_dofs)`` adjacency of the DOFs, self included: DOFs sharing a cell."""
    cells = space.basis.element_dofs  # (dofs per cell, n_cells)
    rows = np.repeat(cells, cells.shape[0], axis=0).ravel()
    cols = np.tile(cells, (cells.shape[0], 1)).ravel()
    graph = scipy.sparse.csr_array(
        (np.ones(rows.size), (rows, cols)), shape=(space.n_dofs, space.n_dofs)
    )
    graph.data[:] = 1.0
    return graph


def _canonical_order(space: FunctionSpace) -> np.ndarray:
    """DOF indices sorted by their coordinates (first axis first): the same order
    whatever the numbering of the DOFs."""
    points = space.dof_points
    return np.lexsort(points.T[::-1])


def _n_experts(space: FunctionSpace, experts: int | None, dofs_per_expert: int | None) -> int:
    if experts is not None:
        if experts > space.n_dofs:
            raise ValueError(f"{experts} experts for {space.n_dofs} DOFs: too many")
        return experts
    return max(1, min(space.n_dofs, round(space.n_dofs / dofs_per_expert)))


class _Strategy:
    """Sized by ``experts`` (K) or ``dofs_per_expert``, exactly one of them."""

    def __init__(self, *, experts: int | None = None, dofs_per_expert: int | None = None):
        if (experts is None) == (dofs_per_expert is None):
            raise ValueError("give exactly one of `experts` and `dofs_per_expert`")
        for name, value in (("experts", experts), ("dofs_per_expert", dofs_per_expert)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.experts, self.dofs_per_expert = experts, dofs_per_expert

    def labels(self, space: FunctionSpace) -> np.ndarray:
        raise NotImplementedError

    def partition(self, space: FunctionSpace, *, overlap: int = 0) -> Partition:
        """The partition of ``space``'s DOFs, with ``overlap`` layers around each part."""
        return Partition(space, self.labels(space), overlap=overlap)

    def __repr__(self) -> str:
        size = (
            f"experts={self.experts}"
            if self.experts is not None
            else f"dofs_per_expert={self.dofs_per_expert}"
        )
        return f"{type(self).__name__}({size})"


class BisectionPartition(_Strategy):
    """Recursive coordinate bisection: split the DOFs along their box's longest axis,
    in proportion to the experts on each side, until each part is one expert's."""

    def labels(self, space: FunctionSpace) -> np.ndarray:
        k = _n_experts(space, self.experts, self.dofs_per_expert)
        order = _canonical_order(space)  # ties between equal coordinates broken alike
        labels = np.empty(space.n_dofs, dtype=np.int64)
        points = space.dof_points

        def split(dofs: np.ndarray, parts: int, first: int) -> None:
            if parts == 1:
                labels[dofs] = first
                return
            extent = np.ptp(points[dofs], axis=0)
            axis = int(np.argmax(extent))
            # a stable sort of the canonical order: equal coordinates stay in that order
            along = dofs[np.argsort(points[dofs, axis], kind="stable")]
            left = parts // 2
            cut = round(len(dofs) * left / parts)
            split(along[:cut], left, first)
            split(along[cut:], parts - left, first + left)

        split(order, k, 0)
        return labels


class MetisPartition(_Strategy):
    """METIS (``pymetis``) on the DOF graph: balanced parts with few cut edges, each
    connected. The graph is numbered in coordinate order before METIS sees it, so
    the parts do not depend on the DOF numbering."""

    def labels(self, space: FunctionSpace) -> np.ndarray:
        try:
            import pymetis
        except ImportError:  # pragma: no cover - a dependency, but say what to do
            raise ImportError("MetisPartition needs pymetis: pip install pymetis") from None
        k = _n_experts(space, self.experts, self.dofs_per_expert)
        if k == 1:
            return np.zeros(space.n_dofs, dtype=np.int64)
        order = _canonical_order(space)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        graph = dof_graph(space)
        graph.setdiag(0)
        graph.eliminate_zeros()
        canonical = scipy.sparse.csr_array(graph[order][:, order])
        canonical.sort_indices()
        options = pymetis.Options(seed=0, contig=1)
        _, parts = pymetis.part_graph(
            k,
            pymetis.CSRAdjacency(canonical.indptr.tolist(), canonical.indices.tolist()),
            options=options,
        )
        labels = np.asarray(parts, dtype=np.int64)[rank]
        found = len(np.unique(labels))
        if found < k:  # METIS leaves parts empty on a graph too small for them
            raise ValueError(
                f"METIS made {found} parts of the {k} asked for on {space.n_dofs} DOFs: ask "
                "for fewer experts (or size them by dofs_per_expert), or use "
                "BisectionPartition"
            )
        return _relabelled(labels, order)


def _relabelled(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The same parts numbered by their first DOF in ``order``: labels that do not
    depend on how the partitioner happened to number them."""
    names, first = np.unique(labels[order], return_index=True)
    renamed = np.empty(int(names.max()) + 1, dtype=np.int64)
    renamed[names] = np.argsort(np.argsort(first))
    return renamed[labels]


class GivenPartition:
    """Labels given by the caller, one per DOF (e.g. materials, a user's own split)."""

    def __init__(self, labels):
        self.given = np.asarray(labels)

    def labels(self, space: FunctionSpace) -> np.ndarray:
        return self.given

    def partition(self, space: FunctionSpace, *, overlap: int = 0) -> Partition:
        return Partition(space, self.given, overlap=overlap)

    def __repr__(self) -> str:
        return f"GivenPartition({self.given.size} labels)"
