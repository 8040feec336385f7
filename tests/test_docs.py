"""The pages of docs/: their code runs as written, and does what they say."""

import re

import h5py
import numpy as np
import pytest

from fenop.cli import main
from tests.helpers import ROOT

FENCED = r"```python\n(.*?)```"


def test_the_hand_written_store_of_the_formats_page_is_predicted_on(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "formats.md").read_text()
    (snippet,) = [b for b in re.findall(FENCED, text, flags=re.DOTALL) if "my_fields.h5" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/formats.md", "exec"), {})
    assert main(["info", "my_fields.h5"]) == 0
    assert main(["predict", "darcy-fno", "my_fields.h5", "-o", "predicted.h5", "-q"]) == 0
    with h5py.File("predicted.h5") as f:
        assert f["u"].shape == (5, 17 * 17)


def test_the_hand_written_trajectory_of_the_formats_page_opens_with_named_dims(
    tmp_path, monkeypatch, capsys
):
    from fenop.data import open_store

    text = (ROOT / "docs" / "formats.md").read_text()
    (snippet,) = [b for b in re.findall(FENCED, text, flags=re.DOTALL) if "my_traj" in b]
    assert len(snippet.strip().splitlines()) <= 14
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/formats.md", "exec"), {})
    assert main(["info", "my_trajectories.h5"]) == 0
    assert "11 states from t = 0 to 0.1" in capsys.readouterr().out
    with open_store("my_trajectories.h5") as ds:
        assert ds["u"].dims == ("sample", "time", "dof") and ds["a"].dims == ("sample", "dof")
        assert ds["u"].shape == (3, 11, 17 * 17)
        # the page's field is a decaying mode: the last state is the first times e^-2π²t
        np.testing.assert_allclose(
            ds["u"].isel(time=-1), ds["u"].isel(time=0) * np.exp(-0.2 * np.pi**2), atol=1e-15
        )


def test_the_readme_links_every_guide_page_and_the_index_lists_them():
    readme = (ROOT / "README.md").read_text()
    index = (ROOT / "docs" / "index.md").read_text()
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md") if p.stem != "index")
    assert pages
    for page in pages:
        assert f"docs/{page}.md" in readme, page
        assert f"\n{page}\n" in index, page


@pytest.mark.parametrize("page", ["concepts", "own_data", "hard_constraints", "dynamics"])
def test_the_python_blocks_of_a_guide_page_run(page, tmp_path, monkeypatch):
    text = (ROOT / "docs" / f"{page}.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, f"docs/{page}.md", "exec"), {})


def test_the_own_pde_page_constrains_a_model_by_its_residual():
    import torch

    text = (ROOT / "docs" / "own_pde.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    scope = {}
    torch.manual_seed(0)
    exec(compile("\n".join(blocks), "docs/own_pde.md", "exec"), scope)
    u, model = scope["u"], scope["model"]
    assert u.shape == (2, 1, scope["space"].n_dofs)
    assert model.constraint.report["converged"].all()
    # the page's claim: R = u at the Dirichlet DOFs, so the boundary values stay zero
    assert u[:, 0, scope["space"].boundary_dofs].abs().max() == 0
