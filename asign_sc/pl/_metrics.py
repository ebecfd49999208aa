"""``pl.metrics``: per-gene accuracy of an imputation against its baselines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from asign_sc._docs import doc_params
from asign_sc._stack import get_table
from asign_sc.pl._common import PLOT_DOCS, finish, panel_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["metrics"]

logger = logging.getLogger(__name__)


@doc_params(**PLOT_DOCS)
def metrics(
    data: AnnData | SpatialData,
    key: str = "asign_eval",
    *,
    baselines: Sequence[str] | None = None,
    n_genes: int = 5,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure | None:
    """Per-gene Pearson correlation of an imputation beside its baselines.

    Reads what :func:`asign_sc.tl.evaluate` wrote: ``var[f"{{key}}_pcc_{{method}}"]`` and
    ``uns[key]``. Panels, left to right:

    * one scatter per baseline: each gene's PCC with the baseline (x) against with the
      method (y); genes above the diagonal are better imputed by the method (coloured as
      the method, the others grey), and the share of them is in the title. A baseline whose
      per-gene PCC is the same for every gene (the known section's mean profile predicts
      one profile for every spot, so its PCC is 0 or undefined for every gene) gets no
      scatter: it stays in the distribution panel;
    * the distribution of per-gene PCC of every method (box plot with the genes as dots);
    * the ``n_genes`` genes the method imputes best and worst, with the baselines' PCC as
      markers.

    Parameters
    ----------
    data
        The evaluated AnnData or SpatialData.
    key
        ``key_added`` of :func:`asign_sc.tl.evaluate`.
    baselines
        Baselines to show. Default: all that were evaluated.
    n_genes
        Genes listed at each end of the ranking.
    figsize, dpi
        Figure size in inches (default: 3.2 per panel wide, at least 3.4 high) and
        resolution.
    {show_save}
    ax
        Axes to draw into, one per panel, or one axes whose cell of the figure's grid is
        split into the panels.

    Returns
    -------
    {returns}

    Raises
    ------
    KeyError
        No evaluation under ``key``.
    """
    table = get_table(data)
    record = table.uns.get(key)
    if record is None or "params" not in record:
        raise KeyError(
            f"No evaluation under uns[{key!r}]. Run asign_sc.tl.evaluate(data, sections=..., "
            f"key_added={key!r}) first, or pass key=."
        )
    params = record["params"]
    method = str(params["key"])
    evaluated = [str(b) for b in np.atleast_1d(params.get("baselines", []))]
    baselines = evaluated if baselines is None else [str(b) for b in baselines]
    unknown = [b for b in baselines if b not in evaluated]
    if unknown:
        raise ValueError(f"Baselines {unknown} were not evaluated under {key!r}: {evaluated}.")
    methods = [method, *baselines]
    columns = {m: f"{key}_pcc_{m}" for m in methods}
    missing = [c for c in columns.values() if c not in table.var]
    if missing:
        raise KeyError(f"var{missing} missing; rerun asign_sc.tl.evaluate(key_added={key!r}).")
    pcc = pd.DataFrame({m: table.var[c].to_numpy(dtype=float) for m, c in columns.items()})
    pcc.index = table.var_names
    pcc = pcc[np.isfinite(pcc[method])]
    if pcc.empty:
        raise ValueError(f"No gene has a defined PCC under {key!r} (constant truth?).")

    colors = _colors(methods)
    scattered = [b for b in baselines if not _degenerate(pcc[b])]
    if len(scattered) < len(baselines):
        logger.info(
            "pl.metrics: no scatter for %s (the same per-gene PCC for every gene).",
            [b for b in baselines if b not in scattered],
        )
    n_panels = len(scattered) + 2
    ranked = pcc.sort_values(method, ascending=False)
    n = min(n_genes, len(ranked) // 2) if len(ranked) > 1 else 1
    fig, axes = panel_axes(
        ax,
        n_panels,
        figsize=figsize or (3.2 * n_panels, max(3.4, 0.22 * 2 * n + 1.2)),
        dpi=dpi,
        width_ratios=[1.0] * len(scattered) + [0.9, 1.1],
    )
    sections = ", ".join(str(s) for s in np.atleast_1d(params.get("sections", [])))
    fig.suptitle(f"Per-gene PCC on {sections} ({len(pcc)} genes)", fontsize="medium")
    lo = float(min(-0.1, np.nanmin(pcc.to_numpy()) - 0.05))
    hi = float(max(0.5, np.nanmax(pcc.to_numpy()) + 0.05))
    for panel, baseline in zip(axes, scattered, strict=False):
        x, y = pcc[baseline].to_numpy(), pcc[method].to_numpy()
        ok = np.isfinite(x)
        better = y[ok] > x[ok]
        panel.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--", zorder=0)
        panel.axhline(0, color="0.85", lw=0.6, zorder=0)
        panel.axvline(0, color="0.85", lw=0.6, zorder=0)
        panel.scatter(x[ok][better], y[ok][better], s=14, color=colors[method], label="better")
        panel.scatter(x[ok][~better], y[ok][~better], s=14, color="0.55", label="not better")
        panel.set_xlim(lo, hi)
        panel.set_ylim(lo, hi)
        panel.set_aspect("equal")
        panel.set_xlabel(f"PCC {baseline}")
        panel.set_ylabel(f"PCC {method}")
        share = better.mean() if better.size else float("nan")
        panel.set_title(f"vs {baseline}: better on {share:.0%}", fontsize="medium")
        if baseline == scattered[0]:
            panel.legend(
                title=f"genes, {method} vs baseline", fontsize="x-small", title_fontsize="x-small",
                loc="upper left", frameon=False,
            )  # fmt: skip

    dist = axes[len(scattered)]
    values = [pcc[m].dropna().to_numpy() for m in methods]
    box = dist.boxplot(
        values,
        **_horizontal(),
        widths=0.5,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "0.2"},
    )
    for patch, m in zip(box["boxes"], methods, strict=True):
        patch.set_facecolor(colors[m])
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for i, v in enumerate(values, start=1):
        dist.scatter(v, i + rng.uniform(-0.15, 0.15, len(v)), s=6, color=colors[methods[i - 1]])
        dist.text(lo + 0.01, i - 0.34, f"mean {v.mean():.2f}", ha="left", fontsize="x-small")
    dist.set_yticks(range(1, len(methods) + 1), methods)
    dist.axvline(0, color="0.85", lw=0.6, zorder=0)
    dist.set_xlim(lo, hi)
    dist.set_xlabel("per-gene PCC")
    dist.invert_yaxis()
    dist.set_title("distribution", fontsize="medium")

    picked = pd.concat([ranked.head(n), ranked.tail(n)]) if len(ranked) > 1 else ranked
    bars = axes[-1]
    pos = np.arange(len(picked))
    bars.barh(pos, picked[method], color=colors[method], alpha=0.8, label=method)
    for baseline in baselines:
        bars.scatter(
            picked[baseline], pos, marker="|", s=70, color=colors[baseline], label=baseline
        )
    if len(ranked) > 1:
        bars.axhline(n - 0.5, color="0.3", lw=0.6, ls=":")
    bars.set_yticks(pos, picked.index, fontsize="small")
    bars.invert_yaxis()
    bars.axvline(0, color="0.4", lw=0.6)
    bars.set_xlabel("per-gene PCC")
    bars.set_title(f"best and worst {n} genes", fontsize="medium")
    bars.legend(fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return finish(fig, show=show, save=save, return_fig=return_fig, dpi=dpi)


def _degenerate(values: pd.Series) -> bool:
    """No two genes differ: nothing to compare gene by gene (e.g. the mean profile's PCC)."""
    finite = values.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    return finite.size == 0 or bool(np.ptp(finite) < 1e-9)


def _colors(methods: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _horizontal() -> dict:
    """``boxplot`` keyword for horizontal boxes (``vert`` is deprecated in matplotlib 3.10)."""
    import matplotlib

    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
