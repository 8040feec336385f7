import pytest
import torch

from fenop.fem import Normalizer


def test_round_trip_on_fe_and_grid_tensors():
    normalizer = Normalizer([1.0, -2.0], [2.0, 0.5])
    for shape in ((3, 2, 7), (3, 2, 4, 5)):
        x = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(normalizer.decode(normalizer.encode(x)), x)
    x = torch.tensor([[[3.0], [-1.0]]])
    torch.testing.assert_close(normalizer.encode(x), torch.tensor([[[1.0], [2.0]]]))
    assert Normalizer.from_json(normalizer.to_json()).to_json() == [[1.0, -2.0], [2.0, 0.5]]
    assert Normalizer.of(normalizer) is normalizer
    assert Normalizer.of(([1.0], [2.0])).to_json() == [[1.0], [2.0]]


def test_errors():
    normalizer = Normalizer([1.0, -2.0], [2.0, 0.5])
    with pytest.raises(ValueError, match=r"\(batch, 2, ...\), got \(3, 1, 7\)"):
        normalizer.encode(torch.zeros(3, 1, 7))
    with pytest.raises(ValueError, match="positive std"):
        Normalizer([0.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        Normalizer([0.0, 1.0], [1.0])
