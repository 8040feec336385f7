import pytest

from fenop.data import generate
from fenop.fem import unit_square
from fenop.train.config import ConfigError
from fenop.train.run import build_from_config, read_config, train_from_config

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
    where = HIERARCHY if processor == "femultigrid" else GRID
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
