import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fenop.data import FieldDataset, generate
from fenop.data.store import create_store, write_samples
from fenop.fem import FunctionSpace, l_shape, unit_square


@pytest.fixture(scope="module")
def darcy(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "darcy.h5"
    return generate("darcy", 12, l_shape(9), seed=0, path=path, chunk_size=5, progress=False)


def test_items_batches_and_splits(darcy):
    full = FieldDataset(darcy, inputs=["a"], outputs=["u"], dtype=torch.float64)
    test = FieldDataset(
        darcy, inputs=["a"], outputs=["u"], indices=range(8, 12), dtype=torch.float64
    )
    assert len(full) == 12 and len(test) == 4
    x, y = test[1]
    torch.testing.assert_close(x, full[9][0])
    torch.testing.assert_close(y, full[9][1])
    torch.testing.assert_close(test[-1][1], full[11][1])
    batch = full.__getitems__([7, 2, 7])  # any order, repeats allowed
    torch.testing.assert_close(batch[0][1], batch[2][1])
    torch.testing.assert_close(batch[1][0], full[2][0])
    with pytest.raises(IndexError):
        test[4]


def test_two_fields_stack_as_channels(darcy):
    both = FieldDataset(darcy, inputs=["a", "u"], outputs=["u"])
    x, _ = both[0]
    assert x.shape == (2, both.space.n_dofs) and x.dtype == torch.float32


def test_dataloader_workers_read_the_same_batches(darcy):
    dataset = FieldDataset(darcy)
    serial = list(DataLoader(dataset, batch_size=5))
    parallel = list(DataLoader(dataset, batch_size=5, num_workers=2))
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        torch.testing.assert_close(x0, x1)
        torch.testing.assert_close(y0, y1)


def test_reading_is_lazy(darcy):
    dataset = FieldDataset(darcy)
    dataset[0]
    arrays = [v for v in vars(dataset).values() if isinstance(v, np.ndarray | torch.Tensor)]
    assert all(a.size <= len(dataset) for a in arrays)  # indices only, never field data


def test_normalizer_statistics_are_integrals_independent_of_the_mesh(tmp_path):
    """A field of known mean and variance over the domain, on a coarse and a fine mesh."""

    def f(x):
        return 3.0 + 2.0 * np.cos(np.pi * x[0])  # mean 3, variance 2 over [0, 1]^2

    stats = []
    for n in (9, 33):
        # A graded mesh: vertex density varies, so unweighted DOF averages would be biased.
        mesh = unit_square(n)
        mesh = type(mesh)(mesh.p**2, mesh.t)
        space = FunctionSpace(mesh)
        path = tmp_path / f"f{n}.h5"
        create_store(path, space, fields=["f"], n_samples=2)
        write_samples(path, 0, {"f": np.stack([space.interpolate(f).numpy()] * 2)})
        stats.append(FieldDataset(path, inputs=["f"], outputs=["f"]).normalizer(["f"]))
    for normalizer, tol in zip(stats, (0.05, 0.005), strict=True):
        assert normalizer.mean.item() == pytest.approx(3.0, abs=tol)
        assert normalizer.std.item() == pytest.approx(np.sqrt(2.0), abs=tol)


def test_bad_arguments(darcy):
    with pytest.raises(ValueError, match=r"missing field 'p'"):
        FieldDataset(darcy, inputs=["p"])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        FieldDataset(darcy, indices=[0, 12])


def test_dataset_pickles_after_use_for_spawned_workers(darcy):
    import pickle

    dataset = FieldDataset(darcy, dtype=torch.float64)
    first = dataset[3]  # opens the file and builds the space
    _ = dataset.space
    copy = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(copy[3][1], first[1])
    assert copy.space.n_dofs == dataset.space.n_dofs


def test_normalizers_of_inputs_and_outputs_in_one_pass_equal_each_fitted_alone(darcy):
    dataset = FieldDataset(darcy, indices=range(8))
    inputs, outputs = dataset.normalizers()
    for together, alone in (
        (inputs, dataset.normalizer(["a"])),
        (outputs, dataset.normalizer(["u"])),
    ):
        torch.testing.assert_close(together.mean, alone.mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(together.std, alone.std, rtol=1e-14, atol=0)
