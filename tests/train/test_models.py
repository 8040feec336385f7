import numpy as np
import pytest
import torch

from fenop.fem import FunctionSpace, hierarchy, unit_square
from fenop.operators import FEOperator, MgNO
from fenop.operators.processor import Processor
from fenop.train import (
    PROCESSORS,
    DescriptionError,
    ModelDescription,
    build_model,
    describe_model,
    load_model,
    save_checkpoint,
)

SPACE = FunctionSpace(unit_square(9), dirichlet="boundary")


@pytest.mark.parametrize(
    "description",
    [
        ModelDescription("fno", SPACE, SPACE, options={"n_modes": [4, 4]}, resolution=8),
        ModelDescription("mgno", SPACE, SPACE, options={"width": 4}, resolution=(8, 8)),
        ModelDescription("lsm", SPACE, SPACE, options={"width": 4, "depth": 2}, resolution=8),
        ModelDescription("femultigrid", SPACE, SPACE, levels=hierarchy(unit_square(5), 2)),
    ],
    ids=lambda d: d.processor,
)
def test_a_description_builds_describes_and_round_trips_through_json(description):
    model = build_model(description)
    again = describe_model(model)
    assert again.processor == description.processor
    assert (
        description.options.items()
        <= {k: list(v) if isinstance(v, tuple) else v for k, v in again.options.items()}.items()
    )
    written = again.to_json()
    assert ModelDescription.from_json(written).to_json() == written
    # the same architecture: the weights of one fit the other
    rebuilt = build_model(ModelDescription.from_json(written))
    # (neuraloperator adds its constructor's arguments to the state as "_metadata")
    rebuilt.load_state_dict({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    x = torch.randn(2, 1, SPACE.n_dofs)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_processors_record_their_options_with_defaults():
    net = MgNO(4, 1, grid=(8, 8), width=4)
    assert net.options["width"] == 4 and net.options["n_layers"] == 4  # the default
    assert net.options["grid"] == (8, 8) and "in_channels" not in net.options


def test_bad_descriptions_are_refused_naming_the_problem():
    with pytest.raises(DescriptionError, match="unknown processor 'unet'"):
        build_model(ModelDescription("unet", SPACE, SPACE, resolution=8))
    with pytest.raises(DescriptionError, match="MgNO has no option 'depth'; its options: grid"):
        build_model(ModelDescription("mgno", SPACE, SPACE, options={"depth": 2}, resolution=8))
    with pytest.raises(DescriptionError, match="needs a grid resolution"):
        build_model(ModelDescription("lsm", SPACE, SPACE))
    with pytest.raises(DescriptionError, match="needs its mesh levels"):
        build_model(ModelDescription("femultigrid", SPACE, SPACE))
    with pytest.raises(DescriptionError, match="the model description lacks 'options'"):
        ModelDescription.from_json({"processor": "fno"})


def test_an_option_json_cannot_hold_is_refused_unless_it_is_the_default():
    model = FEOperator(SPACE, SPACE, MgNO(4, 1, grid=(8, 8), width=4), resolution=8)
    assert "activation" not in describe_model(model).to_json()["options"]  # the default
    custom = FEOperator(
        SPACE, SPACE, MgNO(4, 1, grid=(8, 8), width=4, activation=torch.tanh), resolution=8
    )
    with pytest.raises(DescriptionError, match=r"option activation=.* cannot be written to JSON"):
        describe_model(custom).to_json()


class _Smoother(Processor):
    """A processor of the user's on FE coefficients: one learned scale per channel."""

    mesh_native = True

    def __init__(self, spaces, in_channels, out_channels, *, scale=1.0):
        super().__init__()
        self.spaces, self.space = list(spaces), spaces[-1]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(torch.full((out_channels, in_channels), scale))

    def forward(self, x):
        return torch.einsum("oc,bcn->bon", self.weight, x)


def test_a_new_processor_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(PROCESSORS, "smoother", _Smoother)
    description = ModelDescription("smoother", SPACE, SPACE, options={"scale": 0.5}, levels=[SPACE])
    model = build_model(description)
    assert model.native and model.encoder is None  # told by what it declares
    x = torch.randn(2, 1, SPACE.n_dofs)
    loaded = load_model(save_checkpoint(tmp_path / "ckpt", model))
    assert loaded.processor.options == {"scale": 0.5}
    torch.testing.assert_close(loaded(x), model(x))
    interior = np.setdiff1d(np.arange(SPACE.n_dofs), SPACE.boundary_dofs)
    torch.testing.assert_close(model(x)[..., interior], 0.5 * x[..., interior])
