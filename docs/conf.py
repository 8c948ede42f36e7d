"""Sphinx configuration: the API reference from the docstrings (autodoc,
napoleon), the guides in Markdown (MyST). Built with warnings as errors in CI:
    sphinx-build -W -b html docs docs/_build/html
"""
project = "pgest"
author = "the pgest developers"
copyright = "2026, the pgest developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "alabaster"
nitpicky = False
