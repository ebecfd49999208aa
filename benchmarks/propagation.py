"""Benchmark: which across-section neighbourhood lets label propagation impute best.

her2st patients A, B and D on the authors' rigid alignment (``aligned/``, no images, so no
feature similarity), the first ``--sections`` sections of each, the first one known. For
every graph, ``tl.impute(method="propagation")`` (10 steps, known spots clamped) and
``tl.evaluate`` on the other sections: per-gene PCC over the 250 genes of highest mean
count on the known section, log1p counts per 10^4 with the all-gene library size (the
package's definitions). Graphs:

- ``old default``: ``build_3d_graph(across="iou")``, the disc IoU of eq. 1 (the default
  until the kernel);
- ``new default``: ``build_3d_graph()`` with its defaults;
- ``plain kNN``: 8 nearest spots within the section and the 12 nearest spots of all other
  sections together, every weight 1 (a plain nearest-neighbour graph on the same
  coordinates);
- ``plain kNN, 12 per other section``: the same with ``12 * (n_sections - 1)`` nearest
  spots of the other sections, as many across edges as the kernel's at most: is it the
  weighting or the number of neighbours that helps?
- the kernel grid: ``n_neighs_across`` (per other section) x ``kernel_width`` x
  ``across_radius`` (in spot pitches), the rest at the defaults.

The defaults of ``build_3d_graph`` (``across="kernel"``, 12 per other section, width 2,
radius 3.5 pitches) were chosen from this grid: more neighbours and a wider kernel help up
to the largest values tried, with diminishing returns beyond 12 per section, and each edge
costs the network's graph attention time. The gain over the plain kNN graph is the number
of across neighbours: the plain kNN graph with as many scores about the same. Writes
``benchmarks/results/propagation.md``.

Run: ``python benchmarks/propagation.py`` (a few minutes on 2 cores); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
HER2ST = ROOT.parent / "shared" / "data" / "her2st"
RESULT = ROOT / "benchmarks" / "results" / "propagation.md"
KNN_WITHIN, KNN_ACROSS = 8, 12
GRID = {
    "n_neighs_across": (6, 12, 16),
    "kernel_width": (1.0, 2.0, 3.0),
    "across_radius": (2.5, 3.5),
}

logger = logging.getLogger("benchmarks.propagation")


def read_patient(her2st: Path, patient: str, n_sections: int):
    """The first ``n_sections`` sections of a patient, counts and aligned coordinates."""
    from asign_sc.io import read_her2st

    names = [f"{patient}{i}" for i in range(1, n_sections + 1)]
    sdata = read_her2st(
        her2st, patient=patient, sections=names, images=False, coordinates="aligned"
    )
    return sdata.tables["table"]


def plain_knn_graph(
    coords: np.ndarray, sections: np.ndarray, k_within: int = KNN_WITHIN, k_across: int = KNN_ACROSS
) -> sp.csr_matrix:
    """Unit weights: ``k_within`` nearest spots of the own section, ``k_across`` of all others."""
    n = len(coords)
    rows, cols = [], []
    for name in np.unique(sections):
        own, other = np.flatnonzero(sections == name), np.flatnonzero(sections != name)
        _, idx = cKDTree(coords[own]).query(coords[own], k=k_within + 1)
        for i, neighbours in zip(own, idx, strict=True):
            neighbours = own[neighbours[neighbours != np.flatnonzero(own == i)[0]][:k_within]]
            rows.append(np.full(len(neighbours), i))
            cols.append(neighbours)
        _, idx = cKDTree(coords[other]).query(coords[own], k=k_across)
        rows.append(np.repeat(own, k_across))
        cols.append(other[idx.ravel()])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))


def propagation_pcc(table, graph_key: str) -> float:
    """Per-gene PCC of ``impute(method="propagation")`` over ``graph_key``, first section known."""
    from asign_sc import tl

    names = [str(s) for s in table.obs["section"].cat.categories]
    key = f"prop_{graph_key}"
    tl.impute(
        table,
        method="propagation",
        known_sections=names[:1],
        graph_key=graph_key,
        spatial_key="spatial_aligned",
        key_added=key,
        layer_added=key,
    )
    scores = tl.evaluate(table, sections=names[1:], key=key, baselines=(), key_added=f"{key}_eval")
    value = scores.query("method == @key and section == 'all' and metric == 'pcc_gene'")["value"]
    if value.empty:  # the method is named after the key in the tidy table
        value = scores.query("section == 'all' and metric == 'pcc_gene'")["value"]
    del table.layers[key]
    return float(value.iloc[0])


def graph_stats(table, graph_key: str) -> dict[str, float]:
    """Edges per spot within and across sections."""
    conn = sp.csr_matrix(table.obsp[f"{graph_key}_connectivities"])
    codes = table.obs["section"].cat.codes.to_numpy()
    rows = np.repeat(np.arange(conn.shape[0]), np.diff(conn.indptr))
    across = codes[rows] != codes[conn.indices]
    return {
        "within_per_spot": float((~across).sum() / table.n_obs),
        "across_per_spot": float(across.sum() / table.n_obs),
    }


def score_graphs(table, *, grid: bool) -> list[dict]:
    """Old default, new default, plain kNN and (with ``grid``) the kernel grid on one stack."""
    from asign_sc import gr

    out = []

    def record(graph: str, graph_key: str, **params) -> None:
        start = time.perf_counter()
        pcc = propagation_pcc(table, graph_key)
        out.append(
            {
                "graph": graph,
                **params,
                "pcc_gene": pcc,
                **graph_stats(table, graph_key),
                "seconds": time.perf_counter() - start,
            }
        )

    gr.build_3d_graph(table, across="iou", key_added="iou")
    record("old default (IoU)", "iou")
    gr.build_3d_graph(table, key_added="kernel")
    record("new default (kernel)", "kernel")
    coords = np.asarray(table.obsm["spatial_aligned"])[:, :2]
    sections = table.obs["section"].astype(str).to_numpy()
    table.obsp["knn_connectivities"] = plain_knn_graph(coords, sections)
    record("plain kNN", "knn")
    # As many across edges as the default kernel can have: does the weighting matter?
    n_across = 12 * (len(np.unique(sections)) - 1)
    table.obsp["knn_connectivities"] = plain_knn_graph(coords, sections, k_across=n_across)
    record("plain kNN, 12 per other section", "knn")
    if grid:
        for k, width, reach in itertools.product(*GRID.values()):
            gr.build_3d_graph(
                table, n_neighs_across=k, kernel_width=width, across_radius=reach, key_added="grid"
            )
            record("kernel", "grid", k=k, width=width, radius=reach)
    return out


#: Columns shown with one decimal (counts and pitches); other numbers get four.
ONE_DECIMAL = {"k", "width", "radius", "within_per_spot", "across_per_spot"}


def markdown(frame: pd.DataFrame) -> str:
    """A markdown table; NaN (a parameter a graph does not have) shows as ``-``."""

    def cell(column: str, value: object) -> str:
        if isinstance(value, float | np.floating):
            if np.isnan(value):
                return "-"
            return f"{value:.1f}" if column in ONE_DECIMAL else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.shape[1]]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(c, v) for c, v in row.items()) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--her2st", type=Path, default=HER2ST)
    parser.add_argument("--patients", nargs="+", default=["A", "B", "D"])
    parser.add_argument(
        "--sections",
        type=int,
        nargs="+",
        default=[3, 6],
        help="stack sizes; the grid runs on the first only",
    )
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("asign_sc").setLevel(logging.ERROR)

    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for n_sections, patient in itertools.product(args.sections, args.patients):
        table = read_patient(args.her2st, patient, n_sections)
        grid = not args.no_grid and n_sections == args.sections[0]
        for row in score_graphs(table, grid=grid):
            rows.append({"patient": patient, "sections": n_sections, "n_spots": table.n_obs, **row})
        logger.info("patient %s, %d sections: done", patient, n_sections)
    frame = pd.DataFrame(rows)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()

    main_rows = frame[frame["graph"] != "kernel"]
    side = main_rows.pivot_table(
        index=["sections", "patient"], columns="graph", values="pcc_gene", sort=False
    )
    side["new - kNN"] = side["new default (kernel)"] - side["plain kNN"]
    side["new / kNN"] = side["new default (kernel)"] / side["plain kNN"]
    side["new - old"] = side["new default (kernel)"] - side["old default (IoU)"]
    side["new - kNN 12/section"] = (
        side["new default (kernel)"] - side["plain kNN, 12 per other section"]
    )
    side = side.round(4)
    print(side.to_string())
    grid_rows = frame[frame["graph"] == "kernel"]
    summary = None
    if not grid_rows.empty:
        summary = (
            grid_rows.groupby(["k", "width", "radius"])["pcc_gene"]
            .agg(["mean", "min"])
            .join(
                grid_rows.assign(
                    gain=grid_rows["pcc_gene"]
                    - grid_rows.merge(
                        main_rows[main_rows["graph"] == "plain kNN"][
                            ["patient", "sections", "pcc_gene"]
                        ],
                        on=["patient", "sections"],
                        suffixes=("", "_knn"),
                    )["pcc_gene_knn"].to_numpy()
                )
                .groupby(["k", "width", "radius"])["gain"]
                .min()
                .rename("worst gain over kNN")
            )
            .sort_values("mean", ascending=False)
            .round(4)
        )
        print(summary.to_string())
    machine = (
        f"{os.cpu_count()} CPUs, load average (1/5/15 min) {load_before[0]:.1f}/"
        f"{load_before[1]:.1f}/{load_before[2]:.1f} at the start and {load_after[0]:.1f}/"
        f"{load_after[1]:.1f}/{load_after[2]:.1f} at the end; {seconds:.0f} s in all."
    )
    print(machine)
    write_report(args.out, side, summary, frame, machine)
    return frame


def choice(summary: pd.DataFrame) -> str:
    """Where the defaults of ``build_3d_graph`` stand in the grid."""
    from asign_sc.gr._build import ACROSS_RADIUS, KERNEL_WIDTH

    default = (12, KERNEL_WIDTH, ACROSS_RADIUS)
    ranked = summary.reset_index()
    at = ranked[
        (ranked["k"] == default[0])
        & (ranked["width"] == default[1])
        & (ranked["radius"] == default[2])
    ]
    if at.empty:
        return "The defaults are not in this grid."
    best = ranked.iloc[0]
    row = at.iloc[0]
    return (
        f"Defaults (k={default[0]}, width {default[1]:g}, radius {default[2]:g} pitches): "
        f"mean {row['mean']:.4f}, rank {at.index[0] + 1} of {len(ranked)}, worst gain over "
        f"plain kNN {row['worst gain over kNN']:+.4f}. Best in the grid (k={best['k']:.0f}, "
        f"width {best['width']:g}, radius {best['radius']:g}): mean {best['mean']:.4f} "
        f"({best['mean'] - row['mean']:+.4f}) with {best['k'] / default[0]:.2f}x the across "
        "edges; more neighbours keep helping a little, but every edge also costs the network's "
        "graph attention, so the defaults stop at 12 per other section (the former "
        "n_neighs_across)."
    )


def write_report(
    path: Path, side: pd.DataFrame, summary: pd.DataFrame | None, frame: pd.DataFrame, machine: str
) -> None:
    parts = [
        "# Label propagation over the 3D graph: which across-section neighbourhood",
        "",
        "Generated by `python benchmarks/propagation.py`. her2st patients A, B, D on the "
        "authors' rigid alignment (no images, so no feature similarity), the first 3 (and 6) "
        "sections, the first known; `tl.impute(method='propagation')` (10 steps) scored by "
        "`tl.evaluate` as per-gene PCC over the other sections (250 genes of highest mean "
        "count on the known section, log1p counts per 10^4).",
        "",
        "Graphs: old default = `build_3d_graph(across='iou')` (disc IoU of eq. 1); new "
        "default = `build_3d_graph()` (Gaussian kernel, 12 nearest spots per other section "
        "within 3.5 pitches, width 2 pitches); plain kNN = 8 nearest within, 12 nearest "
        "across all other sections, unit weights; plain kNN, 12 per other section = the same "
        "with 12 x (sections - 1) nearest across, as many across edges as the kernel's at most.",
        "",
        "## Per patient: per-gene PCC",
        "",
        markdown(side.reset_index()),
        "",
    ]
    edges = frame[frame["graph"] != "kernel"].groupby("graph", sort=False)["across_per_spot"]
    parts += [
        "Across-section edges per spot (mean over the runs): "
        + ", ".join(f"{graph} {value:.1f}" for graph, value in edges.mean().items())
        + ".",
        "",
    ]
    if summary is not None:
        parts += [
            "## Kernel grid (3 sections; k per other section, width and radius in pitches)",
            "",
            "Mean and minimum per-gene PCC over the patients and the worst gain over plain kNN.",
            "",
            markdown(summary.reset_index()),
            "",
            choice(summary),
            "",
        ]
    parts += [
        "## All runs",
        "",
        markdown(frame.drop(columns="seconds").round(4)),
        "",
        f"Machine: {machine}",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
