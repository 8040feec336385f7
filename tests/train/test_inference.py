import shutil

import h5py
import numpy as np
import pytest
import torch

from fenop._errors import InputError
from fenop.data import StoreError, generate, read_store
from fenop.fem import FunctionSpace, RelativeH1Loss, RelativeL2Loss, unit_square
from fenop.operators import FEOperator, MgNO
from fenop.train import evaluate_store, predict_store, save_checkpoint
from fenop.train.config import read_config
from fenop.train.run import build_from_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference")
    return generate("darcy", 7, unit_square(9), seed=0, path=folder / "d.h5", progress=False)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    net = MgNO(4, 1, grid=(8, 8), width=4, n_layers=1)
    return FEOperator(space, space, net, resolution=8, input_stats=([8.0], [4.0])).to(dtype)


def test_evaluate_store_gives_each_samples_fe_errors(store):
    model = _model(torch.float64)
    evaluation = evaluate_store(model, store, batch_size=3, samples=slice(2, 6), show=2)
    with h5py.File(store) as f:
        a, u = (torch.from_numpy(f[name][2:6])[:, None] for name in ("a", "u"))
    space = read_store(store).space
    with torch.no_grad():
        prediction = model(a)  # float64 in, as the model is: read in its dtype
    np.testing.assert_array_equal(evaluation.samples, [2, 3, 4, 5])
    expected_l2 = RelativeL2Loss(space, reduction="none")(prediction, u).numpy()
    expected_h1 = RelativeH1Loss(space, reduction="none")(prediction, u).numpy()
    np.testing.assert_allclose(evaluation.l2, expected_l2, rtol=1e-12)
    np.testing.assert_allclose(evaluation.h1, expected_h1, rtol=1e-12)
    assert [s.shape for s in evaluation.shown] == [(2, space.n_dofs)] * 3
    assert "over 4 samples" in evaluation.summary()[0]


def test_predict_store_writes_what_the_model_computes(store, tmp_path):
    model = _model()
    output = predict_store(model, store, tmp_path / "p.h5", batch_size=4, progress=False)
    with h5py.File(store) as f, h5py.File(output) as g:
        with torch.no_grad():
            expected = model(torch.from_numpy(f["a"][()].astype(np.float32))[:, None])
        expected = expected[:, 0].double().numpy()
        np.testing.assert_allclose(g["u"][()], expected, rtol=1e-5, atol=1e-6 * abs(expected).max())
        assert g.attrs["model"] == "MgNO"
    assert read_store(output).space.same_dofs(read_store(store).space)


def test_predict_store_refuses_its_input_as_output_and_leaves_nothing_on_failure(
    store, tmp_path, monkeypatch
):
    with pytest.raises(InputError, match="is the input store"):
        predict_store(_model(), store, store, overwrite=True, progress=False)
    model = _model()
    calls = 0

    def failing_forward(x, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("out of memory")
        return FEOperator.forward(model, x, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_store(model, store, tmp_path / "p.h5", batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging file


def test_a_training_run_reads_its_store_once_and_checks_only_the_rows_it_uses(
    store, tmp_path, monkeypatch
):
    import shutil

    path = tmp_path / "d.h5"
    shutil.copy(store, path)
    with h5py.File(path, "r+") as f:
        f["u"][6, 3] = np.nan  # a sample neither split uses
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        f'[data]\npath = "{path}"\nn_train = 4\nn_test = 2\n'
        '[model]\nprocessor = "mgno"\nresolution = 8\n[model.options]\nwidth = 4\n'
        '[training]\nepochs = 1\noutput = "run"\n'
    )
    opened = []
    original = h5py.File.__init__

    def counting(self, name, *args, **kwargs):
        if isinstance(name, str) and name == str(path):
            opened.append(name)
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "__init__", counting)
    _, train, test = build_from_config(read_config(config_file), path=config_file)
    # structure, the rows' values, the normaliser's pass over the training rows
    assert len(opened) <= 4 and train.space is test.space
    other = tmp_path / "e.h5"
    shutil.copy(store, other)
    with h5py.File(other, "r+") as f:
        f["u"][5, 3] = np.nan  # a test sample
    config_file.write_text(config_file.read_text().replace(str(path), str(other)))
    with pytest.raises(StoreError, match="field 'u' holds NaN or Inf in sample 5"):
        build_from_config(read_config(config_file), path=config_file)


def _constrained_darcy(folder):
    """A checkpoint of a small Darcy model with a global hard constraint."""
    from fenop.train.models import ModelDescription, build_model
    from fenop.train.physics import constraint_table

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    table = constraint_table({"kind": "global", "n_basis": 4})
    parameters = read_store(folder / "d.h5").header["parameters"]
    description = ModelDescription(
        "mgno", space, space, in_channels=1, out_channels=1,
        options={"width": 4, "n_layers": 1}, resolution=(8, 8),
        constraint={**table, "pde": "darcy", "parameters": parameters, "inputs": ["a"]},
    )  # fmt: skip
    return save_checkpoint(folder / "ckpt", build_model(description))


def test_a_constrained_model_refuses_data_of_another_problem(store, tmp_path):
    shutil.copy(store, tmp_path / "d.h5")
    model = _constrained_darcy(tmp_path)
    mesh = unit_square(9)
    # Poisson's input is named `a` here too: without the check, predictions of
    # the Darcy problem labelled as Poisson's.
    poisson = generate("poisson", 2, mesh, seed=0, path=tmp_path / "p.h5", progress=False)
    with h5py.File(poisson, "r+") as f:
        f["a"] = f["f"][()]
    with pytest.raises(StoreError, match=r"holds poisson data, but the model's hard constraint"):
        predict_store(model, poisson, tmp_path / "out.h5", inputs=["a"], progress=False)
    loaded = generate("darcy", 2, mesh, seed=0, path=tmp_path / "s.h5", progress=False, source=2.0)
    with pytest.raises(StoreError, match=r"darcy parameters \(source\) give another residual"):
        evaluate_store(model, loaded)
    assert not (tmp_path / "out.h5").exists()
    # Another law of the coefficient is the same problem: predicted as usual.
    other = generate("darcy", 2, mesh, seed=0, path=tmp_path / "o.h5", progress=False, a_high=20.0)
    predict_store(model, other, tmp_path / "out.h5", progress=False)
    assert read_store(tmp_path / "out.h5").header["pde"] == "darcy"


def test_predictions_that_are_not_finite_are_not_written(store, tmp_path):
    shutil.copy(store, tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["a"][3] = 1e300  # a finite float64, but Inf in the model's float32
    with pytest.raises(StoreError, match=r"sample 3 holds values beyond the range of float32"):
        predict_store("darcy-fno", tmp_path / "d.h5", tmp_path / "out.h5", progress=False)
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f["a"][3] = 3e38  # just in float32, far outside what the model saw: NaN out
    with pytest.raises(InputError, match=r"prediction for sample 3 of .*d\.h5 holds NaN or Inf"):
        predict_store("darcy-fno", tmp_path / "d.h5", tmp_path / "out.h5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
