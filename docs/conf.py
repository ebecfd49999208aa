"""Sphinx configuration of the asign_sc documentation.

The tutorials live in ``tutorials/`` at the top of the repository (where a user looks for
them); they are copied next to these pages at build time and executed by myst-nb, so a build
fails when a tutorial no longer runs. ``ASIGN_SC_NB_EXECUTION=off`` skips the execution
(e.g. while editing prose); the her2st data are found at ``ASIGN_SC_HER2ST`` or at
``../shared/data/her2st`` beside the repository.
"""

import os
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "asign_sc"
author = "asign_sc developers"
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
html_theme = "pydata_sphinx_theme"
html_title = "asign_sc"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
# No intersphinx: documentation builds run offline (CI has no internet), and a failed
# inventory download is a warning that -W turns into an error.

# -- tutorials: copied from ../tutorials and executed --------------------------------------
_tutorials = DOCS / "tutorials"
_tutorials.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
    target = _tutorials / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
        shutil.copyfile(notebook, target)
os.environ.setdefault("ASIGN_SC_HER2ST", str(ROOT.parent / "shared" / "data" / "her2st"))
# "force": the tutorials are committed with their outputs (so GitHub shows figures and
# numbers), and every docs build still runs them again, replacing those outputs.
nb_execution_mode = os.environ.get("ASIGN_SC_NB_EXECUTION", "force")
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
