import pytest

from fenop.train.config import ConfigError, read_config

GOOD = """
[data]
path = "d.h5"
n_train = 8
n_test = 4

[model]
processor = "mgno"
resolution = 16
[model.options]
width = 8

[training]
epochs = 2
output = "run"
"""


def test_defaults_and_paths(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    config = read_config(path)
    assert config["data"]["inputs"] == ["a"] and config["training"]["lr"] == 1e-3
    assert config["training"]["grad_clip"] is None
    assert config["data"]["path"] == str(tmp_path / "d.h5")
    assert config["model"]["options"] == {"width": 8}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("epochs = 2", "epochs = 2\nepoch = 3"), r"unknown key training\.epoch"),
        (("epochs = 2", 'epochs = "two"'), r"training\.epochs must be int, got 'two'"),
        (("epochs = 2", "epochs = true"), r"training\.epochs must be int"),
        (("n_test = 4", ""), r"missing key data\.n_test"),
        (("[training]", "[trainig]"), r"unknown section \[trainig\]"),
        (("resolution = 16", "resolution = 16.5"), r"model\.resolution must be int or list"),
        (("epochs = 2", "epochs = 0"), r"training\.epochs must be positive"),
        (("epochs = 2", "epochs = 2\ngrad_clip = -1"), r"training\.grad_clip must be positive"),
        (("epochs = 2", "epochs = 2\ngrad_clip = 'no'"), r"training\.grad_clip must be float"),
        (("[data]", "[data"), "not valid TOML"),
        (("epochs = 2", "epochs = 2\nlr = 0"), r"training\.lr must be positive and finite, got 0"),
        (("epochs = 2", "epochs = 2\nweight_decay = -1"), r"weight_decay must be non-negative"),
        (("epochs = 2", "epochs = 2\nlr = inf"), r"training\.lr must be positive and finite"),
        (("epochs = 2", "epochs = 2\nlr = nan"), r"training\.lr must be positive and finite"),
        (("epochs = 2", "epochs = 2\ngrad_clip = inf"), r"grad_clip must be positive and finite"),
        (
            ("epochs = 2", "epochs = 2\nweight_decay = inf"),
            r"weight_decay must be non-negative and",
        ),
        (("epochs = 2", "epochs = 2\nphysics_weight = inf"), r"physics_weight must be non-negati"),
        (("epochs = 2", "epochs = 2\nphysics_weight = nan"), r"physics_weight must be non-negati"),
        (("epochs = 2", 'epochs = 2\nschedule = "cos"'), r"training\.schedule must be one of"),
        (("epochs = 2", 'epochs = 2\nloss = "l1"'), r"training\.loss must be one of \['l2'"),
        (('"mgno"', '"unet"'), r"model\.processor must be one of \['femultigrid', 'fno'"),
        (("epochs = 2", 'epochs = 2\nparallel = "model"'), r"training\.parallel must be one of"),
        (("epochs = 2", 'epochs = 2\nparallel = "experts"'), r"shards a \[model\.constraint\]"),
        (
            ("[training]", '[model.constraint]\nkind = "global"\nexperts = 4\n[training]'),
            r"model\.constraint\.experts is for kind moe \(the experts\), not global",
        ),
        (("[data]", "[data]\ninputs = []"), r"data\.inputs must list distinct field names"),
        (("[data]", '[data]\noutputs = ["a"]'), r"data\.inputs and data\.outputs must not"),
        (("resolution = 16", "resolution = [16, 0]"), r"model\.resolution must be the grid"),
    ],
)
def test_errors_name_the_key(tmp_path, change, message):
    _refused(tmp_path, GOOD.replace(*change), message)


def _refused(tmp_path, text: str, message: str) -> None:
    """``text`` as a configuration file is refused with ``message`` and the file's name."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_config(path)
    assert str(path) in str(info.value)


HIERARCHY = GOOD.replace(
    'processor = "mgno"\nresolution = 16',
    'processor = "femultigrid"\n[model.hierarchy]\ndomain = "lshape"\nresolution = 5',
)


def test_femultigrid_takes_a_hierarchy_instead_of_a_resolution(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(HIERARCHY)
    model = read_config(path)["model"]
    assert model["resolution"] is None
    assert model["hierarchy"] == {
        "domain": "lshape",
        "resolution": 5,
        "mesh": None,
        "levels": 3,
        "coarser": [],
    }
    path.write_text(HIERARCHY.replace('domain = "lshape"\nresolution = 5', 'mesh = "m/c.msh"'))
    assert read_config(path)["model"]["hierarchy"]["mesh"] == str(tmp_path / "m" / "c.msh")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('[model.hierarchy]\ndomain = "lshape"\nresolution = 5', ""),
            r"femultigrid needs a \[model.hierarchy\]",
        ),
        (
            ("[model.hierarchy]", "resolution = 8\n[model.hierarchy]"),
            "model.resolution is for grid",
        ),
        (
            ('"femultigrid"', '"fno"\nresolution = 8'),
            r"\[model.hierarchy\] is for mesh-native processors only",
        ),
        (('"lshape"', '"disc"'), r"hierarchy.domain must be one of \('square', 'lshape'\)"),
        (("resolution = 5", "levels = 2"), r"hierarchy.resolution .* is required"),
        (("resolution = 5", 'resolution = 5\nmesh = "c.msh"'), "either mesh, or domain"),
        (("resolution = 5", "resolution = 5\nlevels = 0"), "levels must be positive"),
        (("resolution = 5", "resolution = 5\nlevel = 2"), r"unknown key model\.hierarchy\.level"),
        (("resolution = 5", "resolution = 5.0"), r"model\.hierarchy\.resolution must be int"),
        (("resolution = 5", "resolution = 5\ncoarser = [3, 5]"), r"coarser must be .* \[3, 5\]"),
        (("resolution = 5", "resolution = 5\ncoarser = [3.0]"), r"coarser must be vertices"),
        (('domain = "lshape"\nresolution = 5', 'mesh = "c.msh"\ncoarser = [3]'), "not a mesh"),
    ],
)
def test_hierarchy_errors_name_the_key(tmp_path, change, message):
    _refused(tmp_path, HIERARCHY.replace(*change), message)
