"""Sphinx configuration: the guide pages (Markdown) and the API from the docstrings.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import fenop

project = "fenop"
release = version = fenop.__version__
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
# the docstrings are Google style ("Args:", "Returns:", "Raises:")
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
myst_heading_anchors = 3
html_theme = "alabaster"
