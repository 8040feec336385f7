import numpy as np
import pytest
import scipy.sparse
import torch

from fenop.fem import FunctionSpace, colour_graph, unit_square
from fenop.fem.jacobian import JacobianPattern


def _random_graph(n: int, density: float, seed: int) -> scipy.sparse.csr_array:
    return scipy.sparse.csr_array(scipy.sparse.random_array((n, n), density=density, rng=seed))


def _proper(graph, colour) -> bool:
    rows, cols = scipy.sparse.coo_array(graph).coords
    off = rows != cols
    return bool((colour[rows[off]] != colour[cols[off]]).all())


@pytest.mark.parametrize("seed", range(5))
def test_no_edge_joins_two_vertices_of_one_colour(seed):
    graph = _random_graph(60, 0.08, seed)
    order = np.random.default_rng(seed).permutation(60)
    for colour in (colour_graph(graph), colour_graph(graph, order=order)):
        assert _proper(graph, colour)
        # first fit: each vertex's colour is the lowest its neighbours leave, so the
        # colours used are 0, 1, ..., c - 1 and none exceeds the largest degree
        assert set(colour.tolist()) == set(range(colour.max() + 1))
        degree = np.diff(scipy.sparse.csr_array(graph + graph.T).indptr)
        assert colour.max() <= degree.max()


def test_dsatur_is_optimal_on_bipartite_graphs_and_odd_cycles():
    # DSATUR colours every bipartite graph with two colours (Brélaz 1979)
    grid = scipy.sparse.csr_array(
        scipy.sparse.kronsum(_path(7), _path(5))  # a 5 x 7 grid graph
    )
    assert colour_graph(grid).max() == 1
    i = np.arange(7)
    odd = scipy.sparse.coo_array((np.ones(7), (i, (i + 1) % 7)))
    assert colour_graph(odd).max() == 2


def _path(n: int) -> scipy.sparse.csr_array:
    i = np.arange(n - 1)
    return scipy.sparse.csr_array(
        scipy.sparse.coo_array((np.ones(n - 1), (i, i + 1)), shape=(n, n))
    )


def test_the_jacobian_columns_that_share_a_colour_share_no_row():
    space = FunctionSpace(unit_square(9))
    pattern = JacobianPattern(space)
    seeds = pattern.seeds.numpy()
    graph = pattern.dense(torch.ones(1, pattern.nnz, dtype=torch.float64))[0].numpy() != 0
    # rows meeting each colour's columns: at most one column per row
    assert ((graph.astype(int) @ seeds.T) <= 1).all()
    assert pattern.n_colours <= 9


def test_an_order_that_is_not_a_permutation_is_refused():
    with pytest.raises(ValueError, match="permutation"):
        colour_graph(_path(4), order=np.array([0, 1, 1, 3]))
    with pytest.raises(ValueError, match="square"):
        colour_graph(scipy.sparse.csr_array(np.ones((2, 3))))
