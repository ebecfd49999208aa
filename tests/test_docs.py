"""The documentation lists every public name, and the tutorials stay runnable notebooks."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

import asign_sc

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def _public_names() -> list[str]:
    names = [n for n in asign_sc.__all__ if not isinstance(getattr(asign_sc, n), types.ModuleType)]
    modules = [
        (f"{sub}.", getattr(asign_sc, sub)) for sub in ("io", "datasets", "tl", "gr", "pp", "pl")
    ]
    modules += [("models.", asign_sc.models), ("models.encoders.", asign_sc.models.encoders)]
    for prefix, module in modules:
        names += [
            prefix + n
            for n in module.__all__
            if not isinstance(getattr(module, n), types.ModuleType)
        ]
    return names


@pytest.mark.parametrize("name", _public_names())
def test_api_reference_lists_every_public_name(name):
    assert f"   {name}\n" in API, f"docs/api.md does not list asign_sc.{name}; add it."


@pytest.mark.parametrize("notebook", sorted((ROOT / "tutorials").glob("*.ipynb")), ids=str)
def test_tutorials_are_in_the_docs_and_stored_executed(notebook):
    index = (ROOT / "docs" / "index.md").read_text()
    assert f"tutorials/{notebook.stem}\n" in index
    code = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    # Stored executed, top to bottom, so GitHub shows numbers and figures ...
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    # ... and every docs build executes them again, so the stored outputs cannot go stale.
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert 'nb_execution_mode = os.environ.get("ASIGN_SC_NB_EXECUTION", "force")' in conf
