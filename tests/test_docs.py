"""docs/formats.md: its snippet writes a store that the command reads as written."""

import re

import h5py

from fenop.cli import main
from tests.helpers import ROOT


def test_the_hand_written_store_of_the_formats_page_is_predicted_on(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "formats.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/formats.md", "exec"), {})
    assert main(["info", "my_fields.h5"]) == 0
    assert main(["predict", "darcy-fno", "my_fields.h5", "-o", "predicted.h5", "-q"]) == 0
    with h5py.File("predicted.h5") as f:
        assert f["u"].shape == (5, 17 * 17)


def test_the_readme_links_the_formats_page():
    assert "docs/formats.md" in (ROOT / "README.md").read_text()
