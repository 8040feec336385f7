"""Graph colouring: vertices in groups that no edge joins.

Two things in fenop are coloured. A residual's Jacobian is recovered from one
linearisation per colour of its columns, two columns sharing a colour only if no
row holds both (a colouring of the DOF graph's square, :mod:`fenop.fem.jacobian`);
and the experts of :class:`~fenop.operators.MoEConstraint` solve at once, a colour
at a time, when none reads where another writes. Both are first-fit colourings:
each vertex takes the lowest colour none of its coloured neighbours has. They
differ in the order the vertices come in: a fixed one (the DOFs' coordinate order,
so that the colouring does not depend on their numbering), or DSATUR's (Brélaz
1979), which next colours the vertex whose neighbours already hold the most
colours, and needs fewer colours (9 instead of 12 for 64 experts on 33 x 33 DOFs).

>>> import numpy as np, scipy.sparse
>>> i = np.arange(6)
>>> cycle = scipy.sparse.coo_array((np.ones(6), (i, (i + 1) % 6)))  # six vertices in a ring
>>> colour_graph(cycle).tolist()                    # DSATUR: two colours, as is optimal
[0, 1, 0, 1, 0, 1]
"""

from __future__ import annotations

import heapq

import numpy as np
import scipy.sparse


def colour_graph(graph: scipy.sparse.sparray, *, order: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` colours ``0, 1, ...`` of the vertices of ``graph`` ``(n, n)`` (its
    nonzero pattern, made symmetric; the diagonal ignored), no two neighbours alike.

    Args:
        graph: the adjacency.
        order: ``(n,)`` the vertices in the order they are coloured. ``None``:
            DSATUR's order, ties to the most neighbours, then the lowest index.
    """
    graph = scipy.sparse.csr_array(graph, dtype=np.float64)
    n = graph.shape[0]
    if graph.shape != (n, n):
        raise ValueError(f"`graph` must be square, got shape {graph.shape}")
    graph = scipy.sparse.csr_array(abs(graph) + abs(graph.T))
    graph.setdiag(0)
    graph.eliminate_zeros()
    indptr, indices = graph.indptr, graph.indices
    colour = np.full(n, -1, dtype=np.int64)
    if order is not None:
        order = np.asarray(order)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"`order` must be a permutation of the {n} vertices")
        for vertex in order:
            colour[vertex] = _lowest_free(colour[indices[indptr[vertex] : indptr[vertex + 1]]])
        return colour
    # DSATUR with a heap of (-saturation, -degree, vertex), stale entries skipped
    degree = np.diff(indptr)
    seen = [set() for _ in range(n)]  # the colours among each vertex's neighbours
    heap = [(0, -int(degree[v]), v) for v in range(n)]
    heapq.heapify(heap)
    while heap:
        minus_saturation, _, vertex = heapq.heappop(heap)
        if colour[vertex] >= 0 or -minus_saturation != len(seen[vertex]):
            continue
        neighbours = indices[indptr[vertex] : indptr[vertex + 1]]
        colour[vertex] = _lowest_free(colour[neighbours])
        for other in neighbours:
            if colour[other] < 0 and colour[vertex] not in seen[other]:
                seen[other].add(int(colour[vertex]))
                heapq.heappush(heap, (-len(seen[other]), -int(degree[other]), int(other)))
    return colour


def _lowest_free(taken: np.ndarray) -> int:
    """The lowest colour not in ``taken`` (``-1``: not coloured yet)."""
    free = np.ones(len(taken) + 1, dtype=bool)
    free[taken[(taken >= 0) & (taken < len(free))]] = False
    return int(np.argmax(free))
