import numpy as np
import pytest
import scipy.sparse.csgraph
import skfem

from fenop.fem import FunctionSpace, l_shape, unit_square
from fenop.fem.partition import (
    BisectionPartition,
    GivenPartition,
    MetisPartition,
    Partition,
    dof_graph,
)

STRATEGIES = [MetisPartition, BisectionPartition]


def _renumbered(mesh: skfem.MeshTri1, seed: int) -> tuple[skfem.MeshTri1, np.ndarray]:
    """The same mesh with its vertices numbered at random: ``(mesh, new_of_old)``."""
    new_of_old = np.random.default_rng(seed).permutation(mesh.p.shape[1])
    points = np.empty_like(mesh.p)
    points[:, new_of_old] = mesh.p
    return skfem.MeshTri1(points, new_of_old[mesh.t]), new_of_old


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("experts", [4, 16])
def test_parts_are_balanced_and_connected(strategy, experts):
    space = FunctionSpace(l_shape(33))
    partition = strategy(experts=experts).partition(space)
    sizes = partition.sizes()
    assert partition.n_experts == experts
    assert sizes.max() <= 1.05 * space.n_dofs / experts  # METIS allows 3 % imbalance
    graph = dof_graph(space)
    for owned in partition.owned:
        n_components, _ = scipy.sparse.csgraph.connected_components(graph[owned][:, owned])
        assert n_components == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parts_do_not_depend_on_the_dof_numbering(strategy):
    mesh = unit_square(17)
    renumbered, new_of_old = _renumbered(mesh, seed=3)
    labels = strategy(experts=8).labels(FunctionSpace(mesh))
    again = strategy(experts=8).labels(FunctionSpace(renumbered))
    np.testing.assert_array_equal(again[new_of_old], labels)
    np.testing.assert_array_equal(strategy(experts=8).labels(FunctionSpace(mesh)), labels)


def test_sized_by_dofs_per_expert_keeps_the_size_on_finer_meshes():
    for n in (17, 33, 65):
        space = FunctionSpace(unit_square(n))
        partition = MetisPartition(dofs_per_expert=100).partition(space)
        assert 0.9 * 100 <= space.n_dofs / partition.n_experts <= 1.1 * 100


def test_overlap_layers_and_halo_follow_the_dof_graph():
    space = FunctionSpace(unit_square(9))
    graph = dof_graph(space).toarray() > 0
    labels = BisectionPartition(experts=4).labels(space)
    flat = Partition(space, labels, overlap=0)
    layered = Partition(space, labels, overlap=2)
    for k in range(4):
        owned = flat.extended[k]
        assert np.array_equal(np.flatnonzero(owned), flat.owned[k])
        one = graph[owned].any(axis=0)
        two = graph[one].any(axis=0)
        assert np.array_equal(layered.extended[k], two)
        assert np.array_equal(layered.halo[k], graph[two].any(axis=0) & ~two)
        assert not (layered.halo[k] & layered.extended[k]).any()


def test_given_labels_and_bad_arguments():
    space = FunctionSpace(unit_square(5))
    labels = (space.dof_points[:, 0] > 0.5).astype(int)
    assert GivenPartition(labels).partition(space).n_experts == 2
    with pytest.raises(ValueError, match="exactly one of"):
        MetisPartition(experts=4, dofs_per_expert=10)
    with pytest.raises(ValueError, match="`experts` must be a positive int"):
        BisectionPartition(experts=0)
    with pytest.raises(ValueError, match="gaps"):
        Partition(space, labels * 2)
    with pytest.raises(ValueError, match="25 integers"):
        Partition(space, labels[:-1])
    with pytest.raises(ValueError, match="too many"):
        MetisPartition(experts=26).labels(space)
    # METIS leaves parts empty on a graph this small: said, not a silent 16 experts
    small = FunctionSpace(unit_square(9))
    with pytest.raises(ValueError, match=r"METIS made \d+ parts of the 64 asked for on 81"):
        MetisPartition(experts=64).labels(small)
    assert BisectionPartition(experts=64).partition(small).n_experts == 64
