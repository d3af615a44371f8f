"""Sphinx configuration of the lightning-emascale documentation (sources in Markdown, read by MyST).

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (the ``docs`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "lightning-emascale"
author = "lightning-emascale developers"
copyright = "2026, lightning-emascale developers"

# plain_math: the docstrings' TeX as HTML text, so the pages need no JavaScript and no network to read
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "plain_math"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3  # links to a page's sections by their titles (`page.md#a-section`)

# The API reference is generated from the docstrings (Google style: "Args:", "Raises:", "Example:").
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Members are listed per directive in api.md: the public ones only, not Lightning's hooks or torch's internals.
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "lightning-emascale"
html_static_path: list[str] = []
