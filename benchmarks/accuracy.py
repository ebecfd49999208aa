"""Accuracy of ASIGN on real tissue, beside baselines, with ablations: the benchmark report.

1. her2st patient C, images C2-C6: registered (``tl.register_sections``), embedded
   (``tl.extract_features``, windows of 3/7/14 spot radii as ``asign-sc run`` uses) and
   connected (``gr.build_3d_graph``) once; the prepared table is cached (``--cache``). Then
   for each known section (default C2 and the middle C4; the rest are unknown and scored):
   mean profile, overlap, similarity, propagation (no model), network alone and full ASIGN
   (``tl.fit_asign`` defaults), all scored by ``tl.evaluate`` on the unknown sections.
   Learned methods: mean +- std over seeds.
2. Ablations (``--ablations``, on in the full mode; on the known sections of
   ``--ablation-known``, default the last of ``--known``, C4, with every seed): the
   paper's attention blocks added back to the default network (cross-attention, graph
   attention, both, and GATv2 layers; the paper's Table II), 2D graph (within-section
   edges only, ``gr.split_graph``) vs 3D (Table IV), network without cross-layer
   imputation (``method="network"``) and 10/20/50% of the known section's spots (the
   others dropped from the stack; Table III), no per-section feature standardisation,
   fixed propagation node weights (``learn_node_weights=False``), blocked validation and
   test-time augmented features (``--dihedral``, on in the full mode; cached).
   With ``--views`` (on in the full mode): ASIGN as a feature-view ensemble, one model
   fitted on EfficientNet-Lite0 features of Macenko-normalised windows and one on
   EfficientNet-Lite2 features of the windows as scanned (features cached), their
   predictions averaged by ``tl.impute(data, [model_a, model_b])``.
3. Expression only, larger scale: patients A, B, D on the authors' aligned coordinates, IoU
   graph, known = first section: mean, overlap, propagation.
4. Cross-patient (``--cross-patient``, on in the full mode): the patient-C models applied to
   B4 from its image alone (``method="network"``), against B4's measured counts, beside the
   known section's mean profile.

Metrics (``tl.evaluate``): per-gene PCC across spots (primary), per-spot PCC across genes
(the paper's), MSE, MAE on ``log1p`` counts per 10^4.

Run from the repository root::

    python benchmarks/accuracy.py --quick   # C2 + C4 known, 1 seed, main methods (minutes)
    python benchmarks/accuracy.py           # 3 seeds, ablations, A/B/D, cross-patient

Writes ``benchmarks/results/accuracy.md`` and ``accuracy.csv`` (``--out`` to change) and,
in the full mode (``--readme``), a short table with the findings into ``README.md``
between the markers ``<!-- accuracy-table:start -->`` and ``<!-- accuracy-table:end -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# Registration repeats to the bit on one ITK thread only (tl.register_sections, Notes); set
# before ANTs is imported so that every rerun of the benchmarks sees the same alignment.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path("/tmp/asign_sc_bench")
METRICS = ("pcc_gene", "pcc_gene_top50", "pcc_spot", "mse", "mae")
MAIN = "main"
MODEL_METHODS = ("asign", "networks_only", "network")
"""Rows of one fitted model: ASIGN, without its linear member, network alone."""
FRACTIONS = (0.1, 0.2, 0.5)
BASELINES = ("mean", "overlap", "similarity", "propagation", "ridge", "ridge_propagation")
ORDER = (
    "mean",
    "overlap",
    "similarity",
    "propagation",
    "ridge",
    "ridge_propagation",
    "network",
    "networks_only",
    "asign",
    "asign_views",
    "same_section",
)
#: Reference rows that read the scored sections' own measurements: ceilings, not competitors.
REFERENCES = ("same_section",)
SAME_SECTION_NEIGHBOURS = 6
LABELS = {
    "mean": "mean profile",
    "overlap": "overlap",
    "similarity": "similarity",
    "propagation": "propagation",
    "ridge": "ridge (image features)",
    "ridge_propagation": "ridge + label spreading",
    "network": "network alone",
    "networks_only": "ASIGN without linear member",
    "asign": "ASIGN",
    "asign_views": "ASIGN, two feature views",
    "same_section": "ceiling: 6 nearest measured spots, same section",
}

logger = logging.getLogger("accuracy")


# -- preparing stacks -----------------------------------------------------------------------
def as_table(sdata):
    """The stack's table as a standalone AnnData (spot sizes in ``uns['spatial']``)."""
    from asign_sc._stack import resolve_stack

    stack = resolve_stack(sdata)
    table = stack.table.copy()
    table.uns["spatial"] = {
        s.name: {"scalefactors": {"spot_diameter_fullres": 2 * s.spot_radius}} for s in stack
    }
    return table


def prepare(
    sdata,
    *,
    register: bool = True,
    feature_kwargs: dict | None = None,
    windows: Sequence[float] | None = None,
):
    """Register, embed (windows scaled to the spot size) and build the 3D graph; a table."""
    from asign_sc import gr, tl
    from asign_sc._pipeline import spot_windows
    from asign_sc._stack import resolve_stack

    if register:
        tl.register_sections(sdata, show_progress_bar=False, seed=0)
    windows = windows or spot_windows(resolve_stack(sdata))
    tl.extract_features(
        sdata, windows=windows, device="cpu", show_progress_bar=False, **(feature_kwargs or {})
    )
    gr.build_3d_graph(sdata)
    return as_table(sdata)


def patient_c(her2st: Path, cache: Path):
    """Patient C (C2-C6) registered, embedded and connected; cached as h5ad."""
    import anndata as ad

    from asign_sc.io import read_her2st

    path = cache / "her2st_C_prepared.h5ad"
    if path.exists():
        logger.info("prepared patient C from cache %s", path)
        return ad.read_h5ad(path)
    start = time.perf_counter()
    sdata = read_her2st(her2st, patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    table = prepare(sdata, feature_kwargs={"cache_dir": cache / "features"})
    cache.mkdir(parents=True, exist_ok=True)
    table.write_h5ad(path)
    logger.info("prepared patient C in %.0f s -> %s", time.perf_counter() - start, path)
    return table


def section_b4(her2st: Path, cache: Path, windows: Sequence[float]):
    """B4 alone: features with patient C's windows and a within-section spatial graph."""
    import anndata as ad
    import squidpy as sq

    from asign_sc import tl
    from asign_sc.io import read_her2st

    path = cache / "her2st_B4_prepared.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    sdata = read_her2st(her2st, patient="B", sections=["B4"])
    tl.extract_features(
        sdata,
        windows=windows,
        device="cpu",
        show_progress_bar=False,
        cache_dir=cache / "features",
    )
    table = as_table(sdata)
    # build_3d_graph needs two sections; one section's graph is its 2D neighbourhood graph
    sq.gr.spatial_neighbors(table, coord_type="generic", n_neighs=8, key_added="spatial3d")
    table.write_h5ad(path)
    return table


# -- scoring ----------------------------------------------------------------------------------
def tidy(scores: pd.DataFrame, **labels) -> list[dict]:
    """``tl.evaluate``'s tidy table as one row per (method, section) with labels."""
    wide = scores.pivot_table(index=["method", "section"], columns="metric", values="value")
    counts = scores.groupby(["method", "section"])[["n_spots", "n_genes"]].first()
    undefined = scores.groupby(["method", "section"])["n_genes_undefined"].max()
    rows = []
    for (method, section), values in wide.iterrows():
        rows.append(
            {
                **labels,
                "method": method,
                "section": section,
                **{m: float(values[m]) for m in METRICS},
                "n_spots": int(counts.loc[(method, section), "n_spots"]),
                "n_genes": int(counts.loc[(method, section), "n_genes"]),
                "n_genes_undefined": int(undefined.loc[(method, section)]),
            }
        )
    return rows


def fit_and_score(
    base,
    known: str,
    seed: int,
    *,
    variant: str,
    fit_kwargs: dict,
    baselines: Sequence[str],
    graph_key: str = "spatial3d",
    edit: Callable | None = None,
    seeded_baselines: bool = False,
) -> tuple[list[dict], object]:
    """Fit ASIGN with ``known`` measured; score ASIGN, network alone and the baselines.

    ``seeded_baselines``: the baselines depend on ``seed`` too (``edit`` draws a random
    subset of spots with it), so they are summarised over seeds like the learned methods.
    """
    from asign_sc import tl

    adata = base.copy()
    if edit is not None:
        adata = edit(adata)
    unknown = [s for s in adata.obs["section"].cat.categories if s != known]
    start = time.perf_counter()
    model = tl.fit_asign(
        adata,
        known_sections=[known],
        graph_key=graph_key,
        seed=seed,
        device="cpu",
        show_progress_bar=False,
        **as_fit_arguments(fit_kwargs),
    )
    seconds = time.perf_counter() - start
    rows = []
    for method in MODEL_METHODS:
        fitted, imputation = model, method
        if method == "networks_only":  # the same networks, without the linear member
            fitted, imputation = model.copy(), "asign"
            fitted.architecture = dataclasses.replace(model.architecture, ridge_member=0.0)
        tl.impute(
            adata, fitted, method=imputation, key_added=method, layer_added=method, device="cpu"
        )
        scores = tl.evaluate(
            adata,
            sections=unknown,
            key=method,
            baselines=baselines if method == "asign" else (),
            key_added=f"eval_{method}",
        )
        labels = {"known": known, "variant": variant, "seed": seed}
        for row in tidy(scores, **labels):
            seeded = seeded_baselines or row["method"] in MODEL_METHODS
            row["seed"] = seed if seeded else np.nan
            rows.append(row)
    if variant == MAIN and "propagation" in baselines:
        labels = {"known": known, "variant": variant, "seed": np.nan}
        rows += same_section_reference(adata, unknown, model.genes, labels)
    logger.info("  %s known=%s seed=%d: fit %.0f s", variant, known, seed, seconds)
    return rows, model


def same_section_reference(adata, sections: Sequence[str], genes: Sequence[str], labels: dict):
    """Each spot of ``sections`` as the mean of its 6 nearest measured spots in its own section.

    Not a method (it reads the scored sections' own counts): how far a spot's expression can
    be told from its neighbours' measurements, the ceiling a 3D imputation could approach.
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    from asign_sc import tl

    genes = list(genes)
    values = np.zeros((adata.n_obs, adata.n_vars), dtype=np.float32)
    columns = adata.var_names.get_indexer(genes)
    for section in sections:
        rows = np.flatnonzero((adata.obs["section"] == section).to_numpy())
        xy = adata.obsm["spatial"][rows]
        truth = _truth(adata[rows], genes)
        _, near = cKDTree(xy).query(xy, k=SAME_SECTION_NEIGHBOURS + 1)
        values[np.ix_(rows, columns)] = truth[near[:, 1:]].mean(axis=1)
    adata.layers["same_section"] = sp.csr_matrix(values)
    scores = tl.evaluate(
        adata,
        sections=sections,
        layer="same_section",
        genes=genes,
        known_sections=[s for s in adata.obs["section"].cat.categories if s not in sections],
        baselines=(),
        key_added="eval_same_section",
    )
    scores["method"] = "same_section"
    return tidy(scores, **labels)


def as_fit_arguments(options: dict) -> dict:
    """Split flat options into ``fit_asign`` arguments and its two config objects."""
    from dataclasses import fields

    from asign_sc.models import ArchitectureConfig, TrainingConfig

    groups = {"architecture": ArchitectureConfig, "training": TrainingConfig}
    out = {
        k: v
        for k, v in options.items()
        if not any(k in {f.name for f in fields(c)} for c in groups.values())
    }
    for name, config in groups.items():
        names = {f.name for f in fields(config)}
        chosen = {k: v for k, v in options.items() if k in names}
        if chosen:
            out[name] = config(**chosen)
    return out


def within_only(adata):
    """Replace the 3D graph by its within-section part (a 2D graph per section)."""
    from asign_sc.gr import split_graph

    within, _ = split_graph(adata)
    adata.obsp["spatial2d_connectivities"] = within
    return adata


def keep_fraction(known: str, fraction: float, seed: int):
    """Drop all but ``fraction`` of the known section's spots (a fixed random subset)."""

    def edit(adata):
        rng = np.random.default_rng(1000 + seed)
        is_known = (adata.obs["section"] == known).to_numpy()
        positions = np.flatnonzero(is_known)
        kept = rng.choice(positions, size=round(fraction * len(positions)), replace=False)
        mask = ~is_known
        mask[kept] = True
        return adata[mask].copy()

    return edit


DIHEDRAL_VARIANT = "test-time augmentation (8 rotations/flips)"


def with_features(features):
    """Edit: the stack with another set of image features (same spots, same graph)."""

    def edit(adata):
        for key, value in features.obsm.items():
            adata.obsm[key] = value[features.obs_names.get_indexer(adata.obs_names)]
        return adata

    return edit


def dihedral_features(her2st: Path, cache: Path):
    """Patient C's features with test-time augmentation (8 views of every window); cached.

    Only the features are kept (``obsm``): the variant swaps them into the main stack, so
    its registration and graph stay those of the main rows.
    """
    from asign_sc.models.encoders import dihedral_average, get_encoder

    encoder = dihedral_average(get_encoder("default"))
    return patient_c_features(her2st, cache, "dihedral", {"encoder": encoder})


#: The feature views of the 'ASIGN, two feature views' rows: features key -> (cache name,
#: extract_features arguments). The first is read by ASIGN's defaults (key "asign").
VIEWS = {
    "asign": ("macenko", {"stain_normalization": "macenko"}),
    "asign_lite2": ("efficientnet_lite2", {"encoder": "efficientnet_lite2"}),
}


def view_features(her2st: Path, cache: Path) -> dict:
    """Patient C's features of every view in :data:`VIEWS`, by features key; cached."""
    return {
        key: patient_c_features(her2st, cache, name, kwargs)
        for key, (name, kwargs) in VIEWS.items()
    }


def with_views(views: dict):
    """Edit: the stack with each view's features under its own key (same spots, same graph)."""

    def edit(adata):
        for key, features in views.items():
            order = features.obs_names.get_indexer(adata.obs_names)
            for name, value in features.obsm.items():
                adata.obsm[name.replace("X_asign", f"X_{key}", 1)] = value[order]
        return adata

    return edit


def fit_and_score_views(base, known: str, seed: int, views: dict, fit_kwargs: dict) -> list[dict]:
    """ASIGN as a feature-view ensemble: one model per view, predictions averaged."""
    from asign_sc import tl

    adata = with_views(views)(base.copy())
    unknown = [s for s in adata.obs["section"].cat.categories if s != known]
    start = time.perf_counter()
    models = []
    for key in views:
        models.append(
            tl.fit_asign(
                adata,
                known_sections=[known],
                genes=models[0].genes if models else None,
                features_key=key,
                key_added=key,
                seed=seed,
                device="cpu",
                show_progress_bar=False,
                **as_fit_arguments(fit_kwargs),
            )
        )
    seconds = time.perf_counter() - start
    tl.impute(adata, models, key_added="asign_views", layer_added="asign_views", device="cpu")
    scores = tl.evaluate(
        adata, sections=unknown, key="asign_views", baselines=(), key_added="eval_views"
    )
    labels = {"known": known, "variant": MAIN, "seed": seed}
    rows = tidy(scores, **labels)
    logger.info("  views known=%s seed=%d: fits %.0f s", known, seed, seconds)
    return rows


def patient_c_features(her2st: Path, cache: Path, name: str, feature_kwargs: dict):
    """Patient C's features from ``extract_features(**feature_kwargs)``; cached as ``name``.

    Only the features are kept (``obsm``), for :func:`with_features` to swap into the main
    stack.
    """
    import anndata as ad

    from asign_sc.io import read_her2st

    path = cache / f"her2st_C_{name}_features.h5ad"
    if path.exists():
        return ad.read_h5ad(path)
    sdata = read_her2st(her2st, patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    table = prepare(sdata, feature_kwargs={**feature_kwargs, "cache_dir": cache / "features"})
    features = ad.AnnData(
        obs=table.obs[[]], obsm={k: v for k, v in table.obsm.items() if k.startswith("X_asign")}
    )
    features.write_h5ad(path)
    return features


PAPER_NETWORK = "paper network (cross-attention, graph attention)"


def ablations(known: str, seed: int, dihedral=None) -> list[dict]:
    """The ablation settings: ``fit_and_score`` arguments beside ``variant``.

    Functional blocks (paper Table II; the defaults leave both attention blocks out, so
    these rows add them back), graph construction (Table IV), CLI and the share
    of known labels (Table III; "no cross-layer imputation" is the main rows' network
    alone, 100% of known spots the main rows), and two of this package's own choices.
    """
    settings = [
        {
            "variant": PAPER_NETWORK,
            "fit_kwargs": {"cross_attention": True, "graph_attention": True},
        },
        {"variant": "with cross-attention", "fit_kwargs": {"cross_attention": True}},
        {"variant": "with graph attention", "fit_kwargs": {"graph_attention": True}},
        {
            "variant": "with graph attention, GATv2 layers",
            "fit_kwargs": {"graph_attention": True, "gat_variant": "gatv2"},
        },
        {
            "variant": "2D graph (within-section edges)",
            "graph_key": "spatial2d",
            "edit": within_only,
            "baselines": ("propagation",),
        },
        {
            "variant": "no per-section feature standardisation",
            "fit_kwargs": {"standardize_features": None},
        },
        {"variant": "fixed node weights", "fit_kwargs": {"learn_node_weights": False}},
        {"variant": "feature noise 0.2", "fit_kwargs": {"feature_noise": 0.2}},
        {"variant": "blocked validation", "fit_kwargs": {"validation": "blocked"}},
    ]
    if dihedral is not None:
        settings.append({"variant": DIHEDRAL_VARIANT, "edit": with_features(dihedral)})
    for fraction in FRACTIONS:
        settings.append(
            {
                "variant": fraction_variant(fraction),
                "edit": keep_fraction(known, fraction, seed),
                "baselines": ("mean", "propagation"),
                "seeded_baselines": True,
            }
        )
    return settings


def fraction_variant(fraction: float) -> str:
    return f"{fraction:.0%} of known spots"


def run_patient_c(
    base,
    knowns: Sequence[str],
    seeds: Sequence[int],
    *,
    ablation_knowns: Sequence[str],
    fit_kwargs: dict,
    ablation_seeds: int | None = None,
    dihedral=None,
    views: dict | None = None,
):
    """Main comparison on every known section, ablations on ``ablation_knowns``.

    ``dihedral``: features with test-time augmentation (:func:`dihedral_features`), an
    ablation row when given. ``views``: the features of :data:`VIEWS`
    (:func:`view_features`), main rows of the feature-view ensemble when given.

    Returns the rows and the first seed's model per known section.
    """
    rows, models = [], {}
    for known in knowns:
        for i, seed in enumerate(seeds):
            new, model = fit_and_score(
                base,
                known,
                seed,
                variant=MAIN,
                fit_kwargs=fit_kwargs,
                baselines=BASELINES if i == 0 else (),
            )
            rows += new
            models.setdefault(known, model)
            if views is not None:
                rows += fit_and_score_views(base, known, seed, views, fit_kwargs)
            if known not in ablation_knowns or (ablation_seeds is not None and i >= ablation_seeds):
                continue
            for setting in ablations(known, seed, dihedral):
                seeded = setting.get("seeded_baselines", False)
                rows += fit_and_score(
                    base,
                    known,
                    seed,
                    variant=setting["variant"],
                    fit_kwargs={**fit_kwargs, **setting.get("fit_kwargs", {})},
                    baselines=setting.get("baselines", ()) if seeded or i == 0 else (),
                    graph_key=setting.get("graph_key", "spatial3d"),
                    edit=setting.get("edit"),
                    seeded_baselines=seeded,
                )[0]
    return rows, models


def run_expression_only(her2st: Path, patients: Sequence[str]) -> list[dict]:
    """Patients A, B, D on aligned coordinates: mean, overlap, propagation; first known."""
    from asign_sc import gr, tl
    from asign_sc.io import read_her2st

    rows = []
    for patient in patients:
        start = time.perf_counter()
        sdata = read_her2st(her2st, patient=patient, images=False, coordinates="aligned")
        gr.build_3d_graph(sdata, similarity=None)
        names = list(sdata.tables["table"].obs["section"].cat.categories)
        tl.impute(sdata, method="propagation", known_sections=names[:1], key_added="propagation")
        scores = tl.evaluate(
            sdata, sections=names[1:], key="propagation", baselines=("mean", "overlap")
        )
        rows += tidy(scores, dataset=f"her2st {patient} (aligned)", known=names[0], variant=MAIN)
        logger.info("patient %s: %.0f s", patient, time.perf_counter() - start)
    return rows


def run_cross_patient(
    her2st: Path, cache: Path, models: dict, profiles: dict, windows: Sequence[float]
) -> list[dict]:
    """Each patient-C model predicts B4 from its image alone; scored on B4's counts.

    The baseline is the mean profile of the patient-C section the model was trained on.
    """
    from asign_sc import tl
    from asign_sc.tl._metrics import mae_per_gene, mse_per_gene, pcc_per_spot

    b4 = section_b4(her2st, cache, windows)
    rows = []
    for known, model in models.items():
        adata = b4.copy()
        genes = [g for g in model.genes if g in adata.var_names]
        # No known section: the network predicts B4 from its image and graph alone.
        tl.impute(adata, model, method="network", known_sections=[], genes=genes, device="cpu")
        scores = tl.evaluate(adata, sections=["B4"], key="asign", baselines=())
        scores["method"] = "network"
        rows += tidy(scores, dataset="cross-patient C -> B4", known=known, variant=MAIN)
        truth = _truth(adata, genes)
        mean = np.broadcast_to(profiles[known].loc[genes].to_numpy(), truth.shape)
        rows.append(
            {
                "dataset": "cross-patient C -> B4",
                "known": known,
                "variant": MAIN,
                "method": "mean",
                "section": "all",
                "pcc_gene": 0.0,
                "pcc_gene_top50": 0.0,
                "pcc_spot": float(np.nanmean(pcc_per_spot(truth, mean))),
                "mse": float(np.mean(mse_per_gene(truth, mean))),
                "mae": float(np.mean(mae_per_gene(truth, mean))),
                "n_spots": truth.shape[0],
                "n_genes": truth.shape[1],
                "n_genes_undefined": int((truth.std(0) == 0).sum()),
            }
        )
    return rows


def _truth(adata, genes):
    from asign_sc.pp import log_normalize

    counts = adata.X.tocsr()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return log_normalize(counts[:, adata.var_names.get_indexer(genes)], totals)


# -- report -----------------------------------------------------------------------------------
def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean +- std over seeds per (dataset, known, variant, method) on all unknown spots."""
    overall = rows[rows["section"] == "all"]
    keys = ["dataset", "known", "variant", "method"]
    grouped = overall.groupby(keys, sort=False)
    summary = grouped[list(METRICS)].agg(["mean", "std"])
    summary.columns = [f"{m}_{s}" for m, s in summary.columns]
    summary["n_seeds"] = grouped["seed"].nunique()
    summary["n_spots"] = grouped["n_spots"].first()
    summary["n_genes"] = grouped["n_genes"].first()
    summary["n_genes_undefined"] = grouped["n_genes_undefined"].first()
    summary = summary.reset_index()
    # keep datasets, known sections and settings in the order they were run; methods in ORDER
    group = summary[["dataset", "known", "variant"]].apply(tuple, axis=1)
    summary["_group"] = group.map({g: i for i, g in enumerate(dict.fromkeys(group))})
    summary["_method"] = summary["method"].map({m: i for i, m in enumerate(ORDER)})
    return summary.sort_values(["_group", "_method"], kind="stable").drop(
        columns=["_group", "_method"]
    )


def _cell(row: pd.Series, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if row["n_seeds"] > 1 and np.isfinite(std):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.3f}"


def markdown_table(summary: pd.DataFrame) -> str:
    lines = [
        "| data | known | setting | method | per-gene PCC | per-gene PCC, top 50 | per-spot PCC "
        "| MSE | MAE | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary.iterrows():
        seeds = str(int(row["n_seeds"])) if row["n_seeds"] else "-"
        lines.append(
            f"| {row['dataset']} | {row['known']} | {row['variant']} | "
            f"{LABELS.get(row['method'], row['method'])} | "
            + " | ".join(_cell(row, m) for m in METRICS)
            + f" | {seeds} |"
        )
    return "\n".join(lines)


def _spread(row: pd.Series, metric: str) -> float:
    """Std over seeds of a summary row (0 for deterministic rows)."""
    std = row[f"{metric}_std"]
    return float(std) if row["n_seeds"] > 1 and np.isfinite(std) else 0.0


def _margin(a: pd.Series, b: pd.Series, metric: str) -> str:
    """Whether ``a - b`` exceeds the two rows' seed spreads (sum of their stds)."""
    spread = _spread(a, metric) + _spread(b, metric)
    if spread == 0:
        return ""
    within = abs(a[f"{metric}_mean"] - b[f"{metric}_mean"]) <= spread
    return ", within the seed spread" if within else ", beyond the seed spread"


def _main_findings(dataset: str, known: str, group: pd.DataFrame) -> str | None:
    if "asign" not in group.index:
        if "propagation" in group.index:
            best = group["pcc_gene_mean"].idxmax()
            return (
                f"{dataset}, known {known}: best per-gene PCC {LABELS[best]} "
                f"({group.loc[best, 'pcc_gene_mean']:.3f}); the mean profile reaches "
                f"per-spot PCC {group.loc['mean', 'pcc_spot_mean']:.3f} with per-gene PCC 0."
            )
        if "network" in group.index:
            net, mean = group.loc["network"], group.loc["mean"]
            return (
                f"{dataset}, model known {known}: image-only per-gene PCC "
                f"{_cell(net, 'pcc_gene')}, per-spot PCC {_cell(net, 'pcc_spot')} vs the mean "
                f"profile's {mean['pcc_spot_mean']:.3f} (MSE {_cell(net, 'mse')} vs "
                f"{mean['mse_mean']:.3f})."
            )
        return None
    a = group.loc["asign"]
    others = group.drop(
        index=["asign", *[r for r in (*REFERENCES, "asign_views") if r in group.index]]
    )
    sentence = [f"{dataset}, known {known}:"]
    for metric, name, higher in (
        ("pcc_gene", "per-gene PCC", True),
        ("pcc_spot", "per-spot PCC", True),
        ("mse", "MSE", False),
    ):
        col = f"{metric}_mean"
        best = others[col].idxmax() if higher else others[col].idxmin()
        other = others.loc[best]
        diff = a[col] - other[col]
        wins = diff > 0 if higher else diff < 0
        sentence.append(
            f"{name} ASIGN {_cell(a, metric)} vs best other {LABELS[best]} "
            f"{_cell(other, metric)} ({'wins' if wins else 'does not win'}, {diff:+.3f}"
            f"{_margin(a, other, metric)});"
        )
    simple = [m for m in ("propagation", "ridge", "ridge_propagation") if m in group.index]
    if simple:
        best = group.loc[simple, "pcc_gene_mean"].idxmax()
        diff = a["pcc_gene_mean"] - group.loc[best, "pcc_gene_mean"]
        sentence.append(
            f"against the best method without a network ({LABELS[best]}, "
            f"{_cell(group.loc[best], 'pcc_gene')}) ASIGN's per-gene PCC is {diff:+.3f}"
            f"{_margin(a, group.loc[best], 'pcc_gene')};"
        )
    if "asign_views" in group.index:
        views = group.loc["asign_views"]
        diff = views["pcc_gene_mean"] - a["pcc_gene_mean"]
        sentence.append(
            f"with two feature views ASIGN's per-gene PCC is {_cell(views, 'pcc_gene')} "
            f"({diff:+.3f} over the default{_margin(views, a, 'pcc_gene')}), per-spot PCC "
            f"{_cell(views, 'pcc_spot')};"
        )
    if "same_section" in group.index:
        ceiling = group.loc["same_section"]
        sentence.append(
            f"the same-section ceiling (6 nearest measured spots) scores "
            f"{_cell(ceiling, 'pcc_gene')};"
        )
    if "mean" in group.index:
        mean_spot = group.loc["mean", "pcc_spot_mean"]
        sentence.append(f"the mean profile alone scores per-spot PCC {mean_spot:.3f}.")
    return " ".join(sentence)


def _ablation_findings(summary: pd.DataFrame) -> list[str]:
    out = []
    keys = ["dataset", "known", "variant", "method"]
    rows = summary.set_index(keys)
    ablated = summary[(summary["variant"] != MAIN) & (summary["method"] == "asign")]
    for (dataset, known), group in ablated.groupby(["dataset", "known"], sort=False):
        full = rows.loc[(dataset, known, MAIN, "asign")]
        network = rows.loc[(dataset, known, MAIN, "network")]
        out.append(
            f"No cross-layer imputation (network alone, known {known}): per-gene PCC "
            f"{_cell(network, 'pcc_gene')} vs {_cell(full, 'pcc_gene')} for full ASIGN "
            f"({network['pcc_gene_mean'] - full['pcc_gene_mean']:+.3f}"
            f"{_margin(network, full, 'pcc_gene')}); per-spot PCC "
            f"{_cell(network, 'pcc_spot')} vs {_cell(full, 'pcc_spot')}."
        )
        for _, row in group.iterrows():
            delta = row["pcc_gene_mean"] - full["pcc_gene_mean"]
            line = (
                f"Ablation '{row['variant']}' (known {known}): ASIGN per-gene PCC "
                f"{_cell(row, 'pcc_gene')} vs {_cell(full, 'pcc_gene')} with the defaults "
                f"({delta:+.3f}{_margin(row, full, 'pcc_gene')})"
            )
            propagation = (dataset, known, row["variant"], "propagation")
            if propagation in rows.index and row["variant"] != MAIN:
                prop = rows.loc[propagation]
                diff = row["pcc_gene_mean"] - prop["pcc_gene_mean"]
                line += (
                    f"; propagation alone in the same setting {_cell(prop, 'pcc_gene')} "
                    f"(ASIGN {'wins' if diff > 0 else 'does not win'}, {diff:+.3f}"
                    f"{_margin(row, prop, 'pcc_gene')})"
                )
            out.append(line + ".")
    return out


def findings(summary: pd.DataFrame) -> list[str]:
    """Plain sentences computed from the summary: where ASIGN wins and where it does not.

    A difference smaller than the sum of the two rows' seed stds is called "within the
    seed spread": with 3 seeds it is not a reliable win or loss.
    """
    out = []
    main = summary[summary["variant"] == MAIN].set_index(["dataset", "known", "method"])
    for (dataset, known), group in main.groupby(level=[0, 1], sort=False):
        line = _main_findings(dataset, known, group.droplevel([0, 1]))
        if line is not None:
            out.append(line)
    return out + _ablation_findings(summary)


def write_report(
    rows: pd.DataFrame, out: Path, *, command: str, seconds: float, notes: Sequence[str]
) -> pd.DataFrame:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    summary.to_csv(out / "accuracy.csv", index=False, float_format="%.5f")
    text = [
        "# Accuracy on real tissue (her2st)",
        "",
        f"Generated by `{command}` in {seconds / 60:.1f} min "
        f"(CPU, {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}). Do not edit by hand; rerun the command.",
        "",
        "Scores on the unknown sections only (every section but the known one), on "
        "`log1p` counts per 10^4 of the model's genes (the known section's 250 genes of "
        "highest mean count). Per-gene PCC: correlation across spots per gene, averaged "
        "(primary; a constant prediction such as the mean profile scores 0); top 50: the same "
        "over the 50 genes most variable on the known section. Per-spot PCC: "
        "correlation across genes per spot (the paper's metric, dominated by the average "
        "profile). Learned methods: mean ± std over seeds; baselines are deterministic "
        "(except beside a random subset of known spots, drawn per seed).",
        "",
        markdown_table(summary),
        "",
        "## Where ASIGN wins and where it does not",
        "",
        *[f"- {line}" for line in findings(summary)],
        "",
        *notes,
        "",
    ]
    (out / "accuracy.md").write_text("\n".join(text))
    logger.info("wrote %s and %s", out / "accuracy.md", out / "accuracy.csv")
    return summary


# -- README block -------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"
README_START = "<!-- accuracy-table:start -->"
README_END = "<!-- accuracy-table:end -->"


def readme_block(summary: pd.DataFrame, *, dataset: str, command: str) -> str:
    """Short table for the README: main methods per known section, ASIGN per ablation."""
    rows = summary[summary["dataset"] == dataset]
    main = rows[rows["variant"] == MAIN]
    ablated = rows[(rows["variant"] != MAIN) & (rows["method"] == "asign")]
    n_seeds = int(main.loc[main["method"] == "asign", "n_seeds"].max())
    lines = [
        f"<!-- generated by `{command}`; do not edit by hand -->",
        f"{dataset}, scored on the sections that are not known (per-gene PCC first; "
        f"learned methods: mean ± std over {n_seeds} seeds; every row, metric and dataset: "
        "[`benchmarks/results/accuracy.md`](benchmarks/results/accuracy.md)).",
        "",
        "| known | method | per-gene PCC | per-gene PCC, top 50 | per-spot PCC |",
        "|---|---|---|---|---|",
    ]
    for _, row in main.iterrows():
        method = LABELS.get(row["method"], row["method"])
        lines.append(
            f"| {row['known']} | {method} | {_cell(row, 'pcc_gene')} | "
            f"{_cell(row, 'pcc_gene_top50')} | {_cell(row, 'pcc_spot')} |"
        )
    for _, row in ablated.iterrows():
        lines.append(
            f"| {row['known']} | ASIGN, {row['variant']} | {_cell(row, 'pcc_gene')} | "
            f"{_cell(row, 'pcc_gene_top50')} | {_cell(row, 'pcc_spot')} |"
        )
    lines += ["", *[f"- {line}" for line in findings(rows)]]
    return "\n".join(lines)


def _readme_parts(path: Path) -> tuple[str, str]:
    """The README's text before the start marker and after the end marker."""
    text = path.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise ValueError(
            f"{path} must hold the markers {README_START!r} and {README_END!r} once each "
            "(in the 'Status and accuracy' section); add them, or pass --no-readme."
        )
    head, rest = text.split(README_START)
    if README_END not in rest:
        raise ValueError(f"In {path}, {README_END!r} comes before {README_START!r}; swap them.")
    return head, rest.split(README_END)[1]


def write_readme(path: Path, block: str) -> None:
    """Replace what lies between the README markers by ``block``; nothing else changes."""
    head, tail = _readme_parts(path)
    path.write_text(f"{head}{README_START}\n{block.strip()}\n{README_END}{tail}")
    logger.info("wrote the accuracy table into %s", path)


VIEWS_NOTE = (
    "'ASIGN, two feature views': a feature-view ensemble, not the default. One model is "
    "fitted (`tl.fit_asign` defaults, same seed and genes) on EfficientNet-Lite0 features of "
    'Macenko-normalised windows (`extract_features(stain_normalization="macenko")`) and one '
    'on EfficientNet-Lite2 features of the windows as scanned (`encoder="efficientnet_lite2"`'
    "), and `tl.impute(data, [model_a, model_b])` averages them (same registration and graph "
    "as the main rows). The pair was chosen on these sections among the Lite0/1/2 encoders, "
    "as scanned and with Macenko (`benchmarks/results/encoders.md` has each alone); it costs "
    "the second view's features and a second fit."
)

ABLATION_NOTES = (
    "Ablations (every other setting as in the main rows). The default network has neither "
    "of the paper's attention blocks (`ArchitectureConfig(cross_attention=False, "
    "graph_attention=False)`: spot, region and global embeddings fused by a linear map of "
    "the mean region/global token, then spot-wise layers; the cross-layer imputation still "
    "propagates over the 3D graph); the first rows add them back: "
    "'paper network': both, the paper's MSAGNet (its 'ASIGN without linear member' row is "
    "the paper's ASIGN, `ArchitectureConfig.paper()`); 'with cross-attention': the levels "
    "fused by cross-attention (eq. 2-3); 'with graph attention': graph-attention rounds of "
    "the paper's GAT (eq. 4) instead of the spot-wise layers, same depth and width; "
    "'with graph attention, GATv2 layers': those rounds as GATv2 (`gat_variant='gatv2'`, "
    "attention from a per-edge hidden vector, about twice the cost per edge); "
    "'2D graph': only within-section edges "
    "(`gr.split_graph`), so neither the network nor the propagation reaches across sections; "
    "'no per-section feature standardisation': `TrainingConfig(standardize_features=None)`; "
    "'fixed node weights': `ArchitectureConfig(learn_node_weights=False)`; "
    "'feature noise 0.2': Gaussian noise of 0.2 x each input feature's spread at"
    " every training step (`TrainingConfig(feature_noise=0.2)`); 'N% of known spots': the "
    "known section keeps a random N% of its spots (drawn per seed), the others are dropped "
    "from the stack; 'blocked validation': early stopping on contiguous patches of the known "
    "section with a one-pitch buffer ring left out (`TrainingConfig(validation='blocked')`) "
    "instead of random spots; 'test-time augmentation': every window encoded in its 8 "
    "rotations/flips and averaged (`models.encoders.dihedral_average`, 8x the feature time), "
    "same graph.",
)


# -- entry points -------------------------------------------------------------------------------
def run_feature_variants(base, variants: dict, knowns, seeds, methods) -> pd.DataFrame:
    """``fit_and_score`` per known section, features and seed: the rows of ``methods``.

    ``variants``: setting name -> features to swap in (:func:`with_features`), or ``None``
    for the base table's own. Ridge and ridge + label spreading once per known section and
    setting (they do not depend on the seed).
    """
    rows = []
    for known in knowns:
        for variant, features in variants.items():
            edit = with_features(features) if features is not None else None
            for i, seed in enumerate(seeds):
                new, _ = fit_and_score(
                    base,
                    known,
                    seed,
                    variant=variant,
                    fit_kwargs={},
                    baselines=("ridge", "ridge_propagation") if i == 0 else (),
                    edit=edit,
                )
                rows += new
    frame = pd.DataFrame(rows)
    frame["dataset"] = "her2st C"
    return frame[frame["method"].isin(methods)]


def patient_c_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """Arguments shared by the patient-C variant benchmarks (stain, encoders)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--her2st", type=Path, default=HER2ST)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--known", nargs="+", default=["C2", "C4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the fits")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def start_variant_run(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse ``argv``, set logging and torch threads, read patient C: ``(args, base, start)``."""
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    return args, patient_c(args.her2st, args.cache), start


def finish_variant_run(args, rows: pd.DataFrame, start: float, report: Callable) -> pd.DataFrame:
    """Summarise ``rows``, write ``report(summary, args, seconds)`` to ``args.out``."""
    summary = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(summary, args, time.perf_counter() - start))
    logger.info("wrote %s", args.out)
    return summary


def synthetic_views(table, seed: int = 0) -> dict:
    """Two views of the synthetic stack: its features, and a noisy rotation of them."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    first = ad.AnnData(
        obs=table.obs[[]], obsm={k: v for k, v in table.obsm.items() if k.startswith("X_asign")}
    )
    dim = first.obsm["X_asign_spot"].shape[1]
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    second = ad.AnnData(
        obs=first.obs,
        obsm={
            k: v @ rotation + rng.normal(scale=0.1, size=v.shape).astype(np.float32)
            for k, v in first.obsm.items()
        },
    )
    return dict(zip(VIEWS, (first, second), strict=True))


def synthetic_table(seed: int = 0):
    """A tiny synthetic stack prepared like patient C (true alignment, small encoder input)."""
    from asign_sc.datasets import synthetic_stack

    sdata, truth = synthetic_stack(
        n_sections=3, n_spots_per_section=60, image_size=256, n_genes=20, seed=seed
    )
    sdata.tables["table"].obsm["spatial_aligned"] = truth.tissue_xy
    return prepare(
        sdata,
        register=False,
        feature_kwargs={"input_size": 64, "tokens": 2},
    )


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, main methods only")
    parser.add_argument("--synthetic", action="store_true", help="tiny synthetic stack (tests)")
    parser.add_argument("--known", nargs="+", default=None, help="known sections (C2 C4)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (full 3, quick 1)")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--ablation-known",
        nargs="+",
        default=None,
        help="known sections of the ablations (default the last of --known: C4)",
    )
    parser.add_argument(
        "--ablation-seeds", type=int, default=None, help="run ablations on the first N seeds only"
    )
    parser.add_argument("--cross-patient", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--dihedral",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ablation row with test-time augmented features (8x feature time; full mode)",
    )
    parser.add_argument("--expression-only", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--views",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="main rows of ASIGN as a two-view ensemble (Lite0 + Macenko, Lite2; full mode)",
    )
    parser.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the short table into README.md between its markers (full mode only)",
    )
    parser.add_argument("--readme-path", type=Path, default=README)
    parser.add_argument("--her2st", type=Path, default=HER2ST)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 measured best)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("asign_sc", "anndata", "spatialdata"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    full = not (args.quick or args.synthetic)
    seeds = list(range(args.seeds if args.seeds else (3 if full else 1)))
    ablations = full if args.ablations is None else args.ablations
    cross = full if args.cross_patient is None else args.cross_patient
    expression = (not args.synthetic) if args.expression_only is None else args.expression_only
    readme = full if args.readme is None else args.readme
    dihedral = (full and ablations) if args.dihedral is None else args.dihedral
    views = full if args.views is None else args.views
    if readme:
        _readme_parts(args.readme_path)  # fail now, not after the run, if the markers are off
    start = time.perf_counter()

    if args.synthetic:
        base = synthetic_table()
        knowns = args.known or ["S1"]
        fit_kwargs = {"hidden_dim": 32, "n_gat_layers": 1, "epochs": 10, "n_models": 1}
        dataset = "synthetic"
    else:
        base = patient_c(args.her2st, args.cache)
        knowns = args.known or ["C2", "C4"]
        fit_kwargs = {}
        dataset = "her2st C"
    ablation_knowns = (args.ablation_known or knowns[-1:]) if ablations else []
    c_rows, models = run_patient_c(
        base,
        knowns,
        seeds,
        ablation_knowns=ablation_knowns,
        fit_kwargs=fit_kwargs,
        ablation_seeds=args.ablation_seeds,
        dihedral=dihedral_features(args.her2st, args.cache) if dihedral else None,
        views=(
            (synthetic_views(base) if args.synthetic else view_features(args.her2st, args.cache))
            if views
            else None
        ),
    )
    profiles = {known: _known_mean(base, known, model.genes) for known, model in models.items()}
    rows = [{"dataset": dataset, **r} for r in c_rows]
    notes = [
        "'network alone' is ASIGN without cross-layer imputation; 'ASIGN without linear member' "
        "is ASIGN with `ArchitectureConfig(ridge_member=0)`, i.e. without the ridge + label "
        "spreading member it averages with (both: the same fitted models). The paper's ASIGN "
        "is the 'paper network' ablation's 'ASIGN without linear member' row."
    ]
    if views:
        notes += ["", VIEWS_NOTE]
    if ablation_knowns:
        notes += ["", *ABLATION_NOTES]
    if expression:
        rows += run_expression_only(args.her2st, ["A", "B", "D"])
    if cross:
        windows = [float(w) for w in base.uns["asign"]["features"]["windows"]]
        rows += run_cross_patient(args.her2st, args.cache, models, profiles, windows)
        notes += [
            "",
            "Cross-patient: B4's graph is its within-section 8-neighbour graph "
            "(squidpy), as one section has no 3D neighbours.",
        ]
    frame = pd.DataFrame(rows)
    command = "python benchmarks/accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    summary = write_report(
        frame, args.out, command=command.strip(), seconds=time.perf_counter() - start, notes=notes
    )
    if readme:
        write_readme(
            args.readme_path, readme_block(summary, dataset=dataset, command=command.strip())
        )
    return summary


def _known_mean(base, known: str, genes: Sequence[str]) -> pd.Series:
    subset = base[(base.obs["section"] == known).to_numpy()]
    return pd.Series(_truth(subset, list(genes)).mean(axis=0), index=list(genes))


if __name__ == "__main__":
    main()
