import json

import numpy as np
import pytest
import torch

from fenop.fem import FunctionSpace, hierarchy, l_shape
from fenop.operators import FNO, LSM, FEMultigrid, FEOperator, MgNO
from fenop.train import CheckpointError, load_checkpoint, load_model, read_config, save_checkpoint
from tests.helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_SLOW

SPACE = FunctionSpace(l_shape(9), dirichlet="boundary")


def _models():
    spaces = hierarchy(l_shape(5), 2, dirichlet="boundary")
    stats = {"input_stats": ([1.0], [2.0]), "output_stats": ([0.0], [0.5])}
    return {
        "fno": FEOperator(
            SPACE, SPACE, FNO(4, 1, n_modes=(6, 6), hidden_channels=8), resolution=16, **stats
        ),
        "mgno": FEOperator(
            SPACE, SPACE, MgNO(4, 1, grid=(16, 16), width=4, n_layers=1), resolution=16
        ),
        "lsm": FEOperator(SPACE, SPACE, LSM(4, 1, width=8, depth=2), resolution=(16, 12), **stats),
        "femultigrid": FEOperator(
            spaces[-1], spaces[-1], FEMultigrid(spaces, 1, 1, width=4, n_layers=1)
        ),
        # Not nested: the coarsest mesh refined would not give the finer ones back.
        "femultigrid-not-nested": FEOperator(
            SPACE, SPACE, FEMultigrid([FunctionSpace(l_shape(n)) for n in (3, 7, 9)], 1, 1, width=4)
        ),
    }


@pytest.mark.parametrize("name", ["fno", "mgno", "lsm", "femultigrid", "femultigrid-not-nested"])
def test_round_trip_gives_the_same_function(tmp_path, name):
    torch.manual_seed(0)
    model = _models()[name]
    save_checkpoint(tmp_path / "ckpt", model, extra={"test_error": 0.5})
    loaded = load_model(tmp_path / "ckpt")
    x = torch.randn(2, 1, model.space_in.n_dofs)
    # The same weights exactly; outputs to float32 rounding, as CPU convolutions may
    # take other kernels (summation orders) for weights at other memory alignments.
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(v, loaded_state[k]) for k, v in state.items() if torch.is_tensor(v))
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    assert read_config(tmp_path / "ckpt")["test_error"] == 0.5
    if name.startswith("femultigrid"):
        for a, b in zip(model.processor.spaces, loaded.processor.spaces, strict=True):
            assert np.array_equal(a.mesh.p, b.mesh.p) and np.array_equal(a.mesh.t, b.mesh.t)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_save_replaces_atomically_and_leaves_no_debris(tmp_path):
    model = _models()["mgno"]
    target = tmp_path / "ckpt"
    save_checkpoint(target, model)
    save_checkpoint(target, model, extra={"epoch": 2})
    assert read_config(target)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    def fail(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(target, model, extra={"epoch": 3}, attach=fail)
    assert read_config(target)["epoch"] == 2  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bad_checkpoints_are_refused_with_a_reason(tmp_path):
    model = _models()["mgno"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none")
    with pytest.raises(
        CheckpointError, match="nor a shipped model; shipped: darcy-femultigrid, darcy-fno"
    ):
        load_model("darcy-fno-unknown")
    target = save_checkpoint(tmp_path / "ckpt", model)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"format 99 .* upgrade fenop"):
        load_checkpoint(target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_checkpoint(target)
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not readable"):
        load_checkpoint(target)
    other = save_checkpoint(tmp_path / "other", _models()["fno"])
    (target / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(target)
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_checkpoint(target)
    with torch.no_grad():  # a diverged model's weights: refused, never scored
        next(model.parameters())[0] = float("nan")
    target = save_checkpoint(tmp_path / "nan", model)
    with pytest.raises(CheckpointError, match=r"NaN or Inf in 1 tensors \(processor\."):
        load_checkpoint(target)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: [1, 2], "config.json does not hold a JSON object"),
        (lambda c: {k: v for k, v in c.items() if k != "model"}, r"has no model description"),
        (lambda c: _without(c, "processor"), "the model description lacks 'processor'"),
        (lambda c: _with(c, resolution="big"), "`resolution` must be 2 ints"),
        (lambda c: _with(c, input_stats=3), "not a model description"),
    ],
)
def test_a_malformed_config_is_one_clear_error(tmp_path, change, message):
    target = save_checkpoint(tmp_path / "ckpt", _models()["mgno"])
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(target)
    assert str(target) in str(info.value)


def _with(config: dict, **model) -> dict:
    return {**config, "model": {**config["model"], **model}}


def _without(config: dict, key: str) -> dict:
    return {**config, "model": {k: v for k, v in config["model"].items() if k != key}}


@pytest.mark.parametrize("name", ["fno", "femultigrid"])
def test_checkpoint_of_a_transferred_model_is_on_its_new_mesh(tmp_path, name):
    model = _models()[name]
    finer = FunctionSpace(l_shape(17), dirichlet="boundary")
    moved = model.transfer(finer)
    loaded = load_model(save_checkpoint(tmp_path / "ckpt", moved))
    assert loaded.space_in.n_dofs == finer.n_dofs
    x = torch.randn(1, 1, finer.n_dofs)
    torch.testing.assert_close(loaded(x), moved(x))


def _constrained_checkpoint(folder):
    """A small checkpoint with every part a description has: options, grid, spaces,
    normalisers and a hard constraint of experts."""
    from fenop.fem import Normalizer, unit_square
    from fenop.train.models import ModelDescription, build_model
    from fenop.train.physics import constraint_table

    space = FunctionSpace(unit_square(9), dirichlet="boundary")
    table = constraint_table({"experts": 4, "n_basis": 4})
    description = ModelDescription(
        "mgno", space, space, in_channels=1, out_channels=1,
        options={"width": 4, "n_layers": 1}, resolution=(8, 8),
        input_stats=Normalizer([1.0], [2.0]), output_stats=Normalizer([0.0], [0.5]),
        constraint={**table, "pde": "darcy", "parameters": {}, "inputs": ["a"]},
    )  # fmt: skip
    return save_checkpoint(folder, build_model(description), extra={"test_error": 0.1, "epoch": 1})


def _leaves(config, prefix=()):
    """The paths to the leaves of a JSON tree (long lists, the mesh, as one leaf)."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield (*prefix, key)
            yield from _leaves(value, (*prefix, key))
    elif isinstance(config, list) and len(config) <= 4:
        for i, value in enumerate(config):
            yield (*prefix, i)
            yield from _leaves(value, (*prefix, i))


_DELETE = object()


def _fuzz_checkpoint(tmp_path, examples: int) -> None:
    """Any value in any field of ``config.json`` (or the field removed): the checkpoint
    loads and runs, or ``fenop info`` and loading refuse it in one line naming it."""
    import contextlib
    import io

    from hypothesis import given
    from hypothesis import strategies as st

    from fenop.cli import main
    from tests.helpers import fuzz_settings, fuzz_values, one_line_naming

    folder = _constrained_checkpoint(tmp_path / "ckpt")
    pristine = json.loads((folder / "config.json").read_text())
    paths = sorted(set(_leaves(pristine)), key=str)
    values = st.one_of(
        st.just(_DELETE), st.integers(-3, 300), st.sampled_from([None, "global", 1e-12]),
        fuzz_values(),
    )  # fmt: skip

    @fuzz_settings(examples)
    @given(st.dictionaries(st.sampled_from(paths), values, min_size=1, max_size=3))
    def check(changes):
        config = json.loads(json.dumps(pristine))
        for path, value in sorted(changes.items(), key=lambda item: len(item[0])):
            parent = config
            try:
                for key in path[:-1]:
                    parent = parent[key]
                if value is _DELETE:
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = value
            except (KeyError, IndexError, TypeError):  # an earlier change replaced the parent
                continue
        (folder / "config.json").write_text(json.dumps(config))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["info", str(folder)])
        assert status in (0, 2), status
        if status == 2:
            assert one_line_naming(err.getvalue(), folder), err.getvalue()
            return
        model = load_checkpoint(folder)
        with torch.no_grad():
            model(torch.zeros(1, 1, model.space_in.n_dofs))

    check()


def test_fuzzed_checkpoints_load_or_are_refused_in_one_line(tmp_path):
    _fuzz_checkpoint(tmp_path, FUZZ_EXAMPLES)


@pytest.mark.slow
def test_fuzzed_checkpoints_at_length(tmp_path):
    _fuzz_checkpoint(tmp_path, FUZZ_EXAMPLES_SLOW)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "local", r"model\.constraint\.kind must be one of \['moe', 'global'\]"),
        ("n_basis", 7, r"a constraint constrains one output field; with n_basis = 7"),
        ("experts", 100000, r"100000 experts for 81 DOFs"),
        ("ridge", -1.0, r"`ridge` must be non-negative"),
    ],
)
def test_a_hand_edited_constraint_is_refused_not_shown(tmp_path, field, value, message):
    # Before, `kind = "local"` and `n_basis = 7` loaded, and `fenop info` showed them.
    folder = _constrained_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["constraint"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(folder)
    assert str(folder) in str(info.value)
