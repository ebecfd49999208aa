"""Benchmark of ``asign_sc.gr.build_3d_graph``: build time, peak memory, recall and growth.

Synthetic stacks of jittered-grid sections (Visium-like: spot radius 27.5 px at a 100 px
pitch, each section slightly rotated and shifted against the others) with 1k, 3k, 10k, 30k
and 100k spots in 5 sections are built with the default across-section kernel
(``across="kernel"``: nearest spots of each other section, Gaussian weights), without
features (``kernel``) and times the cosine of 64-d and 1280-d float32 image-like features
(``kernel+cos``; 1280 is the dimension of the default encoder, EfficientNet-Lite0), and
with the paper's eq. 1 (``across="iou"``): the overlap (IoU) only and IoU + cosine
similarity four ways:

- ``auto``: the default search of ``across="iou"``, exact while sections are small, else
  approximate;
- ``approx``: ``feature_search="approximate"`` (faiss HNSW on principal axes);
- ``exact``: ``feature_search="exact"`` (all pairs of spots of two sections, blockwise),
  run at the first size and where it is predicted (quadratic growth from the previous
  run) to take at most ``--exact-budget`` seconds;
- ``r=3p``: similarity searched within 3 spot pitches (``similarity_radius``).

Recall: for a random sample of spots, the exact top-k across edges by definition (eq. 1
against every spot of the other sections, float64) and the share of them in the graph.

The baseline is the straightforward construction a first implementation would write:
every spot's disc as a shapely polygon with 100 points, the intersection with every spot
of every other section, the full similarity matrix and a sort per spot. It runs at the
first size and where it is predicted (quadratic growth) to finish within
``--baseline-budget`` seconds (0: never); its edges are compared with ours.

Each measurement runs in a fresh process; peak memory is the largest resident set size
seen during the call minus the size just before it (sampled every 2 ms), so the input
(512 MB of features for 100k spots at 1280-d) is not counted.

Run: ``python benchmarks/graph.py`` (10-20 minutes on 2 cores); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time

import numpy as np

PITCH = 100.0
RADIUS = 27.5
K_WITHIN, K_ACROSS = 8, 12


def synthetic_stack(n_spots: int, n_sections: int, feature_dim: int, seed: int = 0):
    """AnnData of ``n_sections`` jittered square grids whose spots overlap across sections."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    per = n_spots // n_sections
    side = int(np.ceil(np.sqrt(per)))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    grid = (np.c_[gx.ravel(), gy.ravel()][:per] - side / 2) * PITCH
    xy, names = [], [f"s{i}" for i in range(n_sections)]
    for _ in names:
        angle = np.deg2rad(rng.uniform(-2, 2))
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        xy.append(grid @ rot.T + rng.uniform(-40, 40, 2) + rng.normal(0, 8, grid.shape))
    xy = np.concatenate(xy)
    n = len(xy)
    # Image-like features: a smooth positive (softplus) function of position plus noise.
    freq = rng.normal(0, 1 / (6 * PITCH), (2, 16))
    field = np.sin(xy @ freq + rng.uniform(0, 2 * np.pi, 16))
    mixing = np.abs(rng.normal(size=(16, feature_dim)))
    features = np.logaddexp(0, field @ mixing + 0.5 * rng.normal(size=(n, feature_dim)))
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"spot{i}" for i in range(n)]))
    adata.obs["section"] = pd.Categorical(np.repeat(names, per), categories=names)
    adata.obsm["spatial"] = xy
    adata.obsm["features"] = features.astype(np.float32)
    adata.uns["spatial"] = {
        s: {"scalefactors": {"spot_diameter_fullres": 2 * RADIUS}} for s in names
    }
    return adata


class PeakRSS:
    """Largest resident set size above the starting one while the context is open."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        self._start = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss - self._start)
            time.sleep(self._interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss - self._start)


#: Modes: label -> (use features, feature_search, similarity_radius in spot pitches, across).
MODES = {
    "kernel": (False, "auto", None, "kernel"),
    "kernel+cos": (True, "auto", None, "kernel"),
    "IoU": (False, "auto", None, "iou"),
    "auto": (True, "auto", None, "iou"),
    "approx": (True, "approximate", None, "iou"),
    "exact": (True, "exact", None, "iou"),
    "r=3p": (True, "auto", 3.0, "iou"),
}


def sampled_recall(adata, n_sample: int, seed: int = 0) -> float:
    """Share of the exact top-k across edges of ``n_sample`` random spots that the graph has.

    The exact edges follow the definition: eq. 1 (closed-form IoU + clipped cosine, float64)
    against every spot of the other sections, ties broken by the smaller position.
    """
    from asign_sc.gr import circle_iou

    rng = np.random.default_rng(seed)
    xy = adata.obsm["spatial"]
    values = adata.obsm["features"]
    section = adata.obs["section"].cat.codes.to_numpy()
    conn = adata.obsp["spatial3d_connectivities"].tocsr()
    query = np.sort(rng.choice(adata.n_obs, min(n_sample, adata.n_obs), replace=False))
    sample = values[query].astype(float)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    cosine = np.empty((len(query), adata.n_obs))
    for start in range(0, adata.n_obs, 8192):  # float64 in blocks
        block = values[start : start + 8192].astype(float)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        cosine[:, start : start + len(block)] = sample @ block.T
    hits = total = 0
    for row, i in enumerate(query):
        others = np.flatnonzero(section != section[i])
        iou = circle_iou(np.linalg.norm(xy[others] - xy[i], axis=1), RADIUS, RADIUS)
        weight = iou + np.maximum(cosine[row, others], 0)
        best = others[np.lexsort((others, -weight))[:K_ACROSS]]
        got = conn.indices[conn.indptr[i] : conn.indptr[i + 1]]
        hits += np.isin(best, got).sum()
        total += len(best)
    return hits / total


def run_ours(
    n_spots: int,
    n_sections: int,
    feature_dim: int,
    mode: str,
    repeats: int,
    with_edges: bool,
    n_recall: int,
    n_jobs: int | None,
    queue,
) -> None:
    import torch  # noqa: F401  (imported by asign_sc anyway; keep its import out of the timing)

    from asign_sc.gr import build_3d_graph

    features, search, radius, across = MODES[mode]

    def build(adata) -> None:
        build_3d_graph(
            adata,
            spatial_key="spatial",
            across=across,
            features_key="features" if features else None,
            similarity="cosine" if features else None,
            feature_search=search,
            similarity_radius=None if radius is None else radius * PITCH,
            n_neighs_within=K_WITHIN,
            n_neighs_across=K_ACROSS,
            n_jobs=n_jobs,
        )

    build(synthetic_stack(200, n_sections, feature_dim, seed=1))  # warm-up: first-call costs
    adata = synthetic_stack(n_spots, n_sections, feature_dim)
    with PeakRSS() as mem:  # memory of the first timed call
        start = time.perf_counter()
        build(adata)
        times = [time.perf_counter() - start]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        build(adata)
        times.append(time.perf_counter() - start)
    conn = adata.obsp["spatial3d_connectivities"].tocoo()
    edges = set(zip(conn.row.tolist(), conn.col.tolist(), strict=True)) if with_edges else set()
    params = adata.uns["spatial3d_neighbors"]["params"]
    queue.put(
        {
            "seconds": min(times),
            "peak_mb": mem.peak / 2**20,
            "n_obs": adata.n_obs,
            "edges_per_spot": conn.nnz / adata.n_obs,
            "search": params["feature_search"],
            "recall": (
                sampled_recall(adata, n_recall)
                if features and n_recall and across == "iou"
                else None
            ),
            "edges": edges,
        }
    )


def run_baseline(n_spots: int, n_sections: int, feature_dim: int, features: bool, queue) -> None:
    """All pairs with shapely polygons of 100 points per circle."""
    import shapely

    adata = synthetic_stack(n_spots, n_sections, feature_dim)
    with PeakRSS() as mem:
        start = time.perf_counter()
        xy = adata.obsm["spatial"]
        section = adata.obs["section"].cat.codes.to_numpy()
        polygons = shapely.buffer(shapely.points(xy), RADIUS, quad_segs=25)  # 100 vertices
        areas = shapely.area(polygons)
        f = adata.obsm["features"].astype(float)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        edges = {}
        for i in range(len(xy)):
            d = np.linalg.norm(xy - xy[i], axis=1)
            same = np.flatnonzero(section == section[i])
            same = same[same != i]
            for j in same[np.argsort(d[same], kind="stable")[:K_WITHIN]]:
                edges[i, j] = d[j]
            others = np.flatnonzero(section != section[i])
            inter = shapely.area(shapely.intersection(polygons[i], polygons[others]))
            weight = inter / (areas[i] + areas[others] - inter)
            if features:
                weight = weight + np.maximum(f[others] @ f[i], 0)
            order = np.lexsort((others, -weight))[:K_ACROSS]
            for j, w in zip(others[order], weight[order], strict=True):
                if w > 0:
                    edges[i, j] = w
        seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_mb": mem.peak / 2**20, "edges": edges})


def measure(target, *args) -> dict:
    """Run ``target(*args, queue)`` in a fresh process and return what it reports."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def agreement(ours: set, baseline: dict) -> float:
    """Fraction of the baseline's edges (spot pairs) that are ours too."""
    return len(ours & baseline.keys()) / max(len(baseline), 1)


def growth(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def predicted(last: tuple[int, float] | None, n: int) -> float:
    """Seconds at ``n`` spots from the last measurement, assuming quadratic growth."""
    return 0.0 if last is None else last[1] * (n / last[0]) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000, 3_000, 10_000, 30_000, 100_000]
    )
    parser.add_argument("--sections", type=int, default=5)
    parser.add_argument("--feature-dims", type=int, nargs="+", default=[64, 1280])
    parser.add_argument(
        "--baseline-budget", type=float, default=60.0, help="0: no baseline (all-pairs) runs"
    )
    parser.add_argument("--exact-budget", type=float, default=120.0)
    parser.add_argument("--recall-spots", type=int, default=500)
    parser.add_argument("--n-jobs", type=int, default=None, help="threads (default: all)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()

    print(
        f"build_3d_graph: {args.sections} sections, k_within={K_WITHIN}, k_across={K_ACROSS}, "
        f"n_jobs={args.n_jobs}. auto: default search; approx/exact: feature_search forced; "
        "r=3p: similarity_radius = 3 spot pitches.\n"
        f"recall: share of the exact top-{K_ACROSS} across edges (eq. 1 by definition, "
        f"float64, all pairs) of {args.recall_spots} random spots found.\n"
        "Baseline: all pairs, shapely polygons with 100 points per circle, full similarity "
        "matrix, a sort per spot (run where predicted to take <= "
        f"{args.baseline_budget:.0f} s). Times: best of 3 below 20k spots, else one run."
    )
    rows = []
    last_baseline: dict[tuple[bool, int], tuple[int, float]] = {}
    last_exact: dict[int, tuple[int, float]] = {}
    for n in args.sizes:
        for dim in args.feature_dims:
            baseline: dict[bool, dict] = {}
            for mode in args.modes:
                features, search, radius, across = MODES[mode]
                if not features and dim != args.feature_dims[0]:
                    continue  # the overlap alone does not depend on the features
                if search == "exact" and predicted(last_exact.get(dim), n) > args.exact_budget:
                    continue
                key = (features, dim)
                run_base = (
                    radius is None
                    and across == "iou"
                    and args.baseline_budget > 0
                    and (
                        features in baseline
                        or predicted(last_baseline.get(key), n) <= args.baseline_budget
                    )
                )
                repeats = 3 if n < 20_000 else 1
                ours = measure(
                    run_ours,
                    n,
                    args.sections,
                    dim,
                    mode,
                    repeats,
                    run_base,
                    args.recall_spots,
                    args.n_jobs,
                )
                if search == "exact":
                    last_exact[dim] = (n, ours["seconds"])
                row = {"n": ours["n_obs"], "dim": dim if features else 0, "mode": mode, **ours}
                if run_base:
                    if features not in baseline:
                        baseline[features] = measure(run_baseline, n, args.sections, dim, features)
                        last_baseline[key] = (n, baseline[features]["seconds"])
                    base = baseline[features]
                    row["base_seconds"] = base["seconds"]
                    row["base_peak_mb"] = base["peak_mb"]
                    row["agreement"] = agreement(ours["edges"], base["edges"])
                del row["edges"]
                rows.append(row)
                print_row(row, header=len(rows) == 1)

    print("growth exponents (slope of log-log fit; 1 = linear, 2 = quadratic):")
    for dim in sorted({r["dim"] for r in rows}):
        for mode in args.modes:
            for low in (0, 10_000):  # all sizes; sizes where fixed costs no longer dominate
                sel = [r for r in rows if r["mode"] == mode and r["dim"] == dim and r["n"] >= low]
                if len(sel) >= 2:
                    n = [r["n"] for r in sel]
                    print(
                        f"  {mode:>6} {dim or '-':>5}, {n[0]:>6}-{n[-1]} spots: time "
                        f"{growth(n, [r['seconds'] for r in sel]):.2f}, peak memory "
                        f"{growth(n, [max(r['peak_mb'], 1e-3) for r in sel]):.2f}"
                    )


def print_row(r: dict, header: bool) -> None:
    """One line of the table (printed as measured, so a long run shows progress)."""
    if header:
        line = (
            f"{'spots':>7} {'dim':>5} {'mode':>6} {'search':>11} {'ours s':>8} {'ours MB':>8} "
            f"{'edges/spot':>10} {'recall':>7} {'all-pairs s':>11} {'all-pairs MB':>12} "
            f"{'speed-up':>9} {'same edges':>10}"
        )
        print(line)
        print("-" * len(line))
    base = "base_seconds" in r
    recall = "-" if r["recall"] is None else f"{r['recall']:.4f}"
    print(
        f"{r['n']:>7} {r['dim'] or '-':>5} {r['mode']:>6} {r['search']:>11} "
        f"{r['seconds']:>8.3f} {r['peak_mb']:>8.1f} {r['edges_per_spot']:>10.1f} {recall:>7} "
        + (
            f"{r['base_seconds']:>11.2f} {r['base_peak_mb']:>12.1f} "
            f"{r['base_seconds'] / r['seconds']:>8.1f}x {r['agreement']:>10.4f}"
            if base
            else f"{'-':>11} {'-':>12} {'-':>9} {'-':>10}"
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
