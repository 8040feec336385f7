"""Reading neuraloperator's Darcy files (a peer's data, kept outside the repository)."""

import numpy as np
import pytest
import torch

from fenop.data import (
    FieldDataset,
    StoreError,
    convert_neuralop_darcy,
    open_store,
    read_neuralop_darcy,
)
from tests.helpers import ROOT

PEER = ROOT.parent / "shared" / "data" / "darcy_test_16.pt"
needs_peer = pytest.mark.skipif(
    not PEER.is_file(), reason=f"peer data not found at {PEER} (kept outside the repository)"
)


def test_grid_values_land_on_the_matching_vertices(tmp_path):
    """A synthetic file in the same layout: value (i, j) must sit at vertex (i/(n-1), j/(n-1))."""
    n = 5
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    y = torch.tensor(np.stack([10.0 * i + j, 100.0 * i - j]), dtype=torch.float32)
    x = torch.stack([torch.tensor(i % 2 == 0), torch.tensor(j % 2 == 0)])
    path = tmp_path / "grid.pt"
    torch.save({"x": x, "y": y}, path)
    space, fields = read_neuralop_darcy(path, a_values=(3.0, 12.0))
    px, py = np.rint(space.dof_points.T * (n - 1))
    np.testing.assert_array_equal(fields["u"][0], 10.0 * px + py)
    np.testing.assert_array_equal(fields["u"][1], 100.0 * px - py)
    np.testing.assert_array_equal(fields["a"][0], np.where(px % 2 == 0, 12.0, 3.0))
    assert len(space.boundary_dofs) == 0


@needs_peer
def test_peer_file_converts_to_a_store_that_trains_like_ours(tmp_path):
    target = convert_neuralop_darcy(PEER, tmp_path / "peer.h5")
    raw = torch.load(PEER, weights_only=True)
    with open_store(target) as ds:
        assert (ds.sizes["sample"], ds.sizes["dof"]) == (50, 256)
        assert set(np.unique(ds["a"].values)) == {3.0, 12.0}
        np.testing.assert_allclose(
            np.sort(ds["u"].values.ravel()), np.sort(raw["y"].numpy().ravel())
        )
    x, y = FieldDataset(target)[0]
    assert x.shape == y.shape == (1, 256)


def test_bad_files(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        read_neuralop_darcy(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(StoreError, match=r"junk\.pt: not a readable torch file"):
        read_neuralop_darcy(tmp_path / "junk.pt")
    torch.save({"x": torch.zeros(2, 4, 4)}, tmp_path / "half.pt")
    with pytest.raises(StoreError, match="'x' and 'y'"):
        read_neuralop_darcy(tmp_path / "half.pt")
    torch.save(
        {"x": torch.zeros(2, 4, 4), "y": torch.full((2, 4, 4), float("nan"))}, tmp_path / "nan.pt"
    )
    with pytest.raises(StoreError, match="NaN or Inf"):
        read_neuralop_darcy(tmp_path / "nan.pt")
    target = tmp_path / "exists.h5"
    target.write_text("keep me")
    with pytest.raises(StoreError, match="exists"):
        convert_neuralop_darcy(tmp_path / "nan.pt", target)
    assert target.read_text() == "keep me"
