"""Sphinx configuration of the documentation site (furo theme, Markdown pages through MyST, API from docstrings).

Build (from the repository root; warnings are errors)::

    sphinx-build -W --keep-going -b html -c docs . docs/_build/html

The source directory is the repository root, so that every Markdown link between README.md, docs/*.md,
BENCHMARKS.md and examples/RESULTS.md works both on the repository's web view and in the site; only the pages
listed in ``include_patterns`` are read.  The pictures (graphs, a diagnostics recording) are drawn by
``docs/figures.py`` at build time, from the library itself, into ``docs/_generated/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

import impartial  # noqa: E402 -- after the path insert above

project = "impartial"
author = "the impartial developers"
release = impartial.__version__
copyright = "the impartial developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
root_doc = "docs/index"
include_patterns = [
    "docs/*.md",
    "docs/_generated/*",
    "README.md",
    "BENCHMARKS.md",
    "examples/RESULTS.md",
    "examples/*.png",
]
exclude_patterns = ["docs/_build/**", ".venv/**"]
source_suffix = {".md": "markdown"}

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Pages written for the repository's web view start at "##" or skip a level (BENCHMARKS.md's run headers); the
# heading levels are a matter of style there, not a broken page.  Every other warning fails the build.
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"impartial {release}"
html_static_path: list[str] = []
html_extra_path = ["site_root"]  # index.html at the site root: a redirect to docs/index.html


def _figures(app: Any) -> None:
    import figures

    figures.main(DOCS / "_generated")


def setup(app: Any) -> None:
    app.connect("builder-inited", _figures)
