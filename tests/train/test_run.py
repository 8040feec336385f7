import json
import shutil

import pytest

import fenop.train.config as config_module
import fenop.train.physics as physics_module
import fenop.train.run as run_module
from fenop._errors import InputError
from fenop.data import generate
from fenop.fem import unit_square
from fenop.train import Trainer
from fenop.train.config import ConfigError
from fenop.train.run import RUN_FILES, build_from_config, read_config, train_from_config
from tests.helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_SLOW

CONFIG = """
[data]
path = "d.h5"
n_train = 6
n_test = 2

[model]
processor = "{processor}"
{where}
[model.options]
{option} = 4

[training]
epochs = 1
output = "run"
device = "{device}"
"""

GRID = "resolution = 8"
HIERARCHY = '[model.hierarchy]\ndomain = "square"\nresolution = 5\nlevels = 2'


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    generate(
        "darcy",
        8,
        unit_square(9),
        seed=0,
        path=folder / "d.h5",
        progress=False,
    )
    return folder


def _config(folder, processor, option, *, device="cpu"):
    # (LSM's default depth 5 pools a grid of 16 down to 1: no coarser grid will do)
    where = {"femultigrid": HIERARCHY, "lsm": "resolution = 16"}.get(processor, GRID)
    path = folder / f"{processor}-{option}-{device}.toml"
    path.write_text(CONFIG.format(processor=processor, where=where, option=option, device=device))
    return path


@pytest.mark.parametrize(
    ("processor", "option", "accepted"),
    [
        ("fno", "hidden_channels", "hidden_channels, n_layers, positional_embedding"),
        ("mgno", "width", "grid, width, n_layers"),
        ("lsm", "width", "width, depth, n_basis"),
        ("femultigrid", "width", "width, n_layers, pre, post"),
    ],
)
def test_an_unknown_processor_option_is_named_with_those_it_has(
    folder, processor, option, accepted
):
    good = _config(folder, processor, option)
    build_from_config(read_config(good), path=good)  # the right name works
    path = _config(folder, processor, option + "s")
    with pytest.raises(ConfigError, match=f"no option '{option}s'; its options: .*{accepted}"):
        build_from_config(read_config(path), path=path)


def test_a_device_that_is_not_here_is_named_before_any_work(folder):
    path = _config(folder, "mgno", "width", device="tpu")
    with pytest.raises(ConfigError, match=r"training\.device: unknown device 'tpu'"):
        train_from_config(path, progress=False)
    assert not (folder / "run").exists()


def _run_files(run) -> dict[str, bytes]:
    """Every file of a run folder with its bytes (hidden ones too)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.fixture
def finished(folder, tmp_path):
    """A folder with a finished run in run/, and the configuration that made it."""
    shutil.copy(folder / "d.h5", tmp_path / "d.h5")
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(processor="mgno", where=GRID, option="width", device="cpu"))
    train_from_config(path, progress=False)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('path = "d.h5"', 'path = "typo.h5"'), "typo.h5: no such file"),
        (("[training]", "[model.constraint]\nexperts = 100000\n[training]"), "model.constraint"),
        (("[training]", "[model.constraint]\nexperts = 4\nridge = -1.0\n[training]"), "`ridge`"),
        (
            ("[training]", '[model.constraint]\nkind = "global"\nn_basis = 5000\n[training]'),
            "5000 basis fields for the 49 free DOFs",
        ),
        (("epochs = 1", "epochs = 1\nphysics_weight = 1"), "takes the fields"),
        (("epochs = 1", "epochs = 1\nlr = 1e3"), "training diverged"),
    ],
)
def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved_an_epoch(
    finished, change, message
):
    run = finished.parent / "run"
    before = _run_files(run)
    text = finished.read_text().replace(*change)
    if "physics_weight" in change[1]:  # a residual that takes `a`, given another field
        text = text.replace("[data]", '[data]\ninputs = ["u"]\noutputs = ["a"]')
    finished.write_text(text)
    with pytest.raises((InputError, FloatingPointError), match=message) as info:
        train_from_config(finished, progress=False, overwrite=True)
    if isinstance(info.value, FloatingPointError):
        assert f"the run {run} held is kept" in str(info.value)
    assert _run_files(run) == before  # byte for byte, nothing aside or half-written


def test_overwrite_replaces_the_run_once_the_new_one_has_saved_an_epoch(finished, monkeypatch):
    run = finished.parent / "run"
    before = _run_files(run)
    finished.write_text(finished.read_text().replace("epochs = 1", "epochs = 2"))
    seen = []
    real = Trainer._write

    def write(self, metrics):  # what the folder holds as the new run goes on
        real(self, metrics)
        seen.append(sorted(p.name for p in run.iterdir()))

    monkeypatch.setattr(Trainer, "_write", write)
    train_from_config(finished, progress=False, overwrite=True)
    # after the new run's first epoch the old run is still aside; after its second, gone
    assert seen == [[".replaced-run", "best", "last", "metrics.jsonl"], RUN_FILES_SORTED]
    after = _run_files(run)
    assert after.keys() == before.keys() and after != before
    epochs = [
        json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]


RUN_FILES_SORTED = sorted(RUN_FILES)


def test_a_run_killed_while_replacing_another_is_put_back_by_the_next(finished, monkeypatch):
    run = finished.parent / "run"
    before = _run_files(run)

    def killed(self, metrics):  # as SIGKILL in the new run's first save: no clean-up runs
        (run / "best").mkdir()
        (run / "best" / "config.json").write_text("{}")
        raise SystemExit("killed")

    monkeypatch.setattr(Trainer, "_write", killed)
    monkeypatch.setattr(run_module, "_restore_replaced_run", lambda folder: None)
    with pytest.raises(SystemExit):
        train_from_config(finished, progress=False, overwrite=True)
    assert (run / ".replaced-run").is_dir() and not (run / "last").exists()
    monkeypatch.undo()
    # The next command of any kind puts the old run back before it looks at the folder.
    with pytest.raises(ConfigError, match="holds a run already"):
        train_from_config(finished, progress=False)
    assert _run_files(run) == before


# Keys a user sets in a configuration, by table (as fenop declares them); the fuzz
# test puts any value in them.
FUZZED_KEYS = {
    "data": sorted(config_module._SCHEMA["data"]),
    "model": ["resolution", "processor"],
    "model.options": ["width", "n_layers"],
    "model.constraint": sorted(
        {key for kind in physics_module.KINDS for key in physics_module.constraint_options(kind)}
    ),
    "training": sorted(set(config_module._SCHEMA["training"]) - {"output"}),
}
FUZZED = """
[data]
path = "d.h5"
n_train = 6
n_test = 2
{data}
[model]
processor = "mgno"
resolution = 8
{model}
[model.options]
width = 4
{options}
[model.constraint]
experts = 4
n_basis = 4
{constraint}
[training]
epochs = 1
output = "run"
device = "cpu"
{training}
"""


def _fuzz_configurations(folder, tmp_path, monkeypatch, examples: int) -> None:
    """Any value in any key: training starts (here, stops before its first step) or
    is refused with one line naming the configuration or the data, nothing written."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests.helpers import fuzz_settings, fuzz_values, one_line_naming, toml_value

    shutil.copy(folder / "d.h5", tmp_path / "d.h5")
    path = tmp_path / "c.toml"
    started = []
    monkeypatch.setattr(Trainer, "fit", lambda self, **kwargs: started.append(1) or [])
    keys = st.sampled_from([(table, key) for table, keys in FUZZED_KEYS.items() for key in keys])
    # Values of the right type half the time, so that examples get past the type
    # checks into the ranges, the choices and the building of model and constraint.
    names = st.sampled_from(["a", "u", "f", "", "mesh_points"])
    typed = st.one_of(
        st.integers(-2, 300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.sampled_from(["moe", "global", "least_squares", "owners", "newton", "metis", "cuda"]),
        st.lists(names, max_size=3),
        st.lists(st.integers(-1, 20), max_size=3),
    )
    values = st.dictionaries(keys, st.one_of(typed, fuzz_values()), min_size=1, max_size=3)

    @fuzz_settings(examples)
    @given(values)
    def check(changes):
        tables = {
            "data": "",
            "model": "",
            "model.options": "",
            "model.constraint": "",
            "training": "",
        }
        for (table, key), value in changes.items():
            tables[table] += f"{key} = {toml_value(value)}\n"
        text = FUZZED.format(
            data=tables["data"],
            model=tables["model"],
            options=tables["model.options"],
            constraint=tables["model.constraint"],
            training=tables["training"],
        )
        # TOML refuses a key given twice: the fuzzed value replaces the default
        for _, key in changes:
            lines = text.split("\n")
            first = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
            if sum(line.startswith(f"{key} = ") for line in lines) > 1:
                del lines[first]
            text = "\n".join(lines)
        path.write_text(text)
        try:
            train_from_config(path, progress=False)
        except InputError as exc:
            assert one_line_naming(str(exc), path, tmp_path), str(exc)  # or the data named
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

    check()


def test_fuzzed_configurations_train_or_are_refused_in_one_line(folder, tmp_path, monkeypatch):
    _fuzz_configurations(folder, tmp_path, monkeypatch, FUZZ_EXAMPLES)


@pytest.mark.slow
def test_fuzzed_configurations_at_length(folder, tmp_path, monkeypatch):
    _fuzz_configurations(folder, tmp_path, monkeypatch, FUZZ_EXAMPLES_SLOW)
