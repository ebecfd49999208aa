"""Plot functions follow scanpy: shown figures are not returned; show=False/return_fig return."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import asign_sc as asc
from asign_sc.pl import _common


@pytest.fixture(scope="module")
def sdata(evaluated_stack):
    return evaluated_stack


def _history() -> dict[str, list]:
    epochs = list(range(5))
    return {"epoch": epochs, "loss": [5.0, 4.0, 3.0, 2.5, 2.0], "val_loss": [5, 4, 4, 3, 3],
            "val_pcc": [0.1, 0.2, 0.3, 0.3, 0.4], "member": [0] * 5}  # fmt: skip


CALLS = {
    "sections": lambda d: asc.pl.sections(d, "Gene011", img=False, **_kw()),
    "registration": lambda d: asc.pl.registration(d, max_side=64, **_kw()),
    "stack_3d": lambda d: asc.pl.stack_3d(d, "Gene011", **_kw()),
    "metrics": lambda d: asc.pl.metrics(d, **_kw()),
    "training": lambda d: asc.pl.training(_history(), **_kw()),
}
_options: dict = {}


def _kw() -> dict:
    return dict(_options)


@pytest.fixture
def shows(monkeypatch):
    """Pretend to be in a notebook: an interactive backend, and count plt.show() calls."""
    calls = []
    monkeypatch.setattr(_common, "interactive_backend", lambda: True)
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    yield calls
    plt.close("all")
    _options.clear()


@pytest.mark.parametrize("name", list(CALLS))
def test_shown_when_interactive_and_then_nothing_is_returned(sdata, shows, name):
    assert CALLS[name](sdata) is None
    assert len(shows) == 1


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("option", [{"show": False}, {"return_fig": True}])
def test_show_false_or_return_fig_returns_the_figure(sdata, shows, name, option):
    _options.update(option)
    fig = CALLS[name](sdata)
    assert isinstance(fig, matplotlib.figure.Figure) and fig.axes
    assert shows == []


@pytest.mark.parametrize("name", list(CALLS))
def test_save_writes_and_does_not_show(sdata, shows, name, tmp_path):
    _options["save"] = tmp_path / f"{name}.png"
    fig = CALLS[name](sdata)
    assert fig is not None and shows == []
    assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_not_shown_on_a_file_backend(sdata, monkeypatch):
    calls = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: calls.append(1))
    assert _common.interactive_backend() is False  # Agg, as in scripts and these tests
    fig = asc.pl.training(_history())
    assert fig is not None and calls == []
    plt.close(fig)


def test_every_plot_takes_ax(sdata):
    fig = plt.figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    asc.pl.metrics(sdata, ax=fig.add_subplot(grid[0, :]), show=False)
    asc.pl.registration(sdata, max_side=64, ax=fig.add_subplot(grid[1, 0]), show=False)
    asc.pl.training(_history(), ax=fig.add_subplot(grid[1, 1]), show=False)
    asc.pl.stack_3d(sdata, "Gene011", ax=fig.add_subplot(grid[2, 0], projection="3d"),
                    show=False)  # fmt: skip
    cells = grid[2, 1].subgridspec(1, 3)
    panels = [fig.add_subplot(cells[0, i]) for i in range(3)]
    asc.pl.sections(sdata, "Gene011", compare=None, img=False, ax=panels, show=False)
    # metrics: 3 panels (the mean profile gets none), registration 2, training 2, 3D 1, sections 3
    drawn = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(drawn) == 3 + 2 + 2 + 1 + 3
    assert all(ax.has_data() or ax.images for ax in drawn)
    np.testing.assert_equal(len(fig.legends), 1)  # the registration's one legend
    plt.close(fig)
