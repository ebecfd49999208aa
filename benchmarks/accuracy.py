"""Accuracy of ASIGN on real tissue, beside baselines, with ablations: the benchmark report.

1. her2st patient C, images C2-C6: registered (``tl.register_sections``), embedded
   (``tl.extract_features``, windows of 3/7/14 spot radii as ``asign-sc run`` uses) and
   connected (``gr.build_3d_graph``) once; the prepared table is cached (``--cache``). Then
   for each known section (default C2 and the middle C4; the rest are unknown and scored):
   mean profile, overlap, similarity, propagation (no model), network alone and full ASIGN
   (``tl.fit_asign`` defaults), all scored by ``tl.evaluate`` on the unknown sections.
   Learned methods: mean +- std over seeds.
2. Ablations (``--ablations``, on in the full mode) that the package exposes as parameters:
   2D graph (within-section edges only, ``gr.split_graph``) vs 3D, no per-section feature
   standardisation, fixed propagation node weights (``learn_node_weights=False``), network
   without cross-layer imputation (``method="network"``), and 10/20/50% of the known
   section's spots (the others dropped from the stack). Not expressible with the package's
   parameters, so not run: without cross-attention, without graph attention
   (``n_gat_layers`` must be >= 1).
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

Writes ``benchmarks/results/accuracy.md`` and ``accuracy.csv`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path("/tmp/asign_sc_bench")
METRICS = ("pcc_gene", "pcc_spot", "mse", "mae")
MAIN = "main"
MODEL_METHODS = ("asign", "network")
BASELINES = ("mean", "overlap", "similarity", "propagation")
ORDER = ("mean", "overlap", "similarity", "propagation", "network", "asign")
LABELS = {
    "mean": "mean profile",
    "overlap": "overlap",
    "similarity": "similarity",
    "propagation": "propagation",
    "network": "network alone",
    "asign": "ASIGN",
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
        tl.register_sections(sdata, progress=False, seed=0)
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
) -> tuple[list[dict], object]:
    """Fit ASIGN with ``known`` measured; score ASIGN, network alone and the baselines."""
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
        **fit_kwargs,
    )
    seconds = time.perf_counter() - start
    rows = []
    for method in MODEL_METHODS:
        tl.impute(adata, model, method=method, key_added=method, layer_added=method, device="cpu")
        scores = tl.evaluate(
            adata,
            sections=unknown,
            key=method,
            baselines=baselines if method == "asign" else (),
            key_added=f"eval_{method}",
        )
        labels = {"known": known, "variant": variant, "seed": seed}
        for row in tidy(scores, **labels):
            row["seed"] = seed if row["method"] in MODEL_METHODS else np.nan
            rows.append(row)
    logger.info("  %s known=%s seed=%d: fit %.0f s", variant, known, seed, seconds)
    return rows, model


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


def run_patient_c(
    base,
    knowns: Sequence[str],
    seeds: Sequence[int],
    *,
    ablations: bool,
    fit_kwargs: dict,
    ablation_seeds: int | None = None,
):
    """Main comparison and ablations on patient C; rows and the first seed's models."""
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
            if not ablations or (ablation_seeds is not None and i >= ablation_seeds):
                continue
            rows += fit_and_score(
                base,
                known,
                seed,
                variant="2D graph (within-section edges)",
                fit_kwargs=fit_kwargs,
                baselines=("propagation",) if i == 0 else (),
                graph_key="spatial2d",
                edit=within_only,
            )[0]
            rows += fit_and_score(
                base,
                known,
                seed,
                variant="no per-section feature standardisation",
                fit_kwargs={**fit_kwargs, "standardize_features": None},
                baselines=(),
            )[0]
            rows += fit_and_score(
                base,
                known,
                seed,
                variant="fixed node weights",
                fit_kwargs={**fit_kwargs, "learn_node_weights": False},
                baselines=(),
            )[0]
            for fraction in (0.1, 0.2, 0.5):
                rows += fit_and_score(
                    base,
                    known,
                    seed,
                    variant=f"{fraction:.0%} of known spots",
                    fit_kwargs=fit_kwargs,
                    baselines=("mean", "propagation"),
                    edit=keep_fraction(known, fraction, seed),
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
        tl.impute(adata, model, method="network", known_sections=["B4"], genes=genes, device="cpu")
        # B4 is given as "known" only because impute needs one; the network never reads it
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
        "| data | known | setting | method | per-gene PCC | per-spot PCC | MSE | MAE | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
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


def findings(summary: pd.DataFrame) -> list[str]:
    """Plain sentences computed from the summary: where ASIGN wins and where it does not."""
    out = []
    main = summary[summary["variant"] == MAIN].set_index(["dataset", "known", "method"])
    for (dataset, known), group in main.groupby(level=[0, 1], sort=False):
        group = group.droplevel([0, 1])
        if "asign" not in group.index:
            if "propagation" in group.index:
                best = group["pcc_gene_mean"].idxmax()
                out.append(
                    f"{dataset}, known {known}: best per-gene PCC {LABELS[best]} "
                    f"({group.loc[best, 'pcc_gene_mean']:.3f}); the mean profile reaches "
                    f"per-spot PCC {group.loc['mean', 'pcc_spot_mean']:.3f} with per-gene PCC 0."
                )
            elif "network" in group.index:
                net, mean = group.loc["network"], group.loc["mean"]
                out.append(
                    f"{dataset}, model known {known}: image-only per-gene PCC "
                    f"{net['pcc_gene_mean']:.3f}, per-spot PCC {net['pcc_spot_mean']:.3f} vs the "
                    f"mean profile's {mean['pcc_spot_mean']:.3f} (MSE {net['mse_mean']:.3f} vs "
                    f"{mean['mse_mean']:.3f})."
                )
            continue
        a = group.loc["asign"]
        others = group.drop(index="asign")
        sentence = [f"{dataset}, known {known}:"]
        for metric, name, higher in (
            ("pcc_gene", "per-gene PCC", True),
            ("pcc_spot", "per-spot PCC", True),
            ("mse", "MSE", False),
        ):
            col = f"{metric}_mean"
            best = others[col].idxmax() if higher else others[col].idxmin()
            diff = a[col] - others.loc[best, col]
            wins = diff > 0 if higher else diff < 0
            sentence.append(
                f"{name} ASIGN {a[col]:.3f} vs best other {LABELS[best]} "
                f"{others.loc[best, col]:.3f} ({'wins' if wins else 'does not win'}, "
                f"{diff:+.3f});"
            )
        if "mean" in group.index:
            mean_spot = group.loc["mean", "pcc_spot_mean"]
            sentence.append(f"the mean profile alone scores per-spot PCC {mean_spot:.3f}.")
        out.append(" ".join(sentence))
    full = summary[(summary["variant"] == MAIN) & (summary["method"] == "asign")]
    ablated = summary[(summary["variant"] != MAIN) & (summary["method"] == "asign")]
    for _, row in ablated.iterrows():
        ref = full[(full["dataset"] == row["dataset"]) & (full["known"] == row["known"])]
        if ref.empty:
            continue
        delta = row["pcc_gene_mean"] - ref["pcc_gene_mean"].iloc[0]
        out.append(
            f"Ablation '{row['variant']}' (known {row['known']}): ASIGN per-gene PCC "
            f"{row['pcc_gene_mean']:.3f} ({delta:+.3f} vs the full setting)."
        )
    return out


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
        "(primary; a constant prediction such as the mean profile scores 0). Per-spot PCC: "
        "correlation across genes per spot (the paper's metric, dominated by the average "
        "profile). Learned methods: mean ± std over seeds; baselines are deterministic.",
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


# -- entry points -------------------------------------------------------------------------------
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
        "--ablation-seeds", type=int, default=None, help="run ablations on the first N seeds only"
    )
    parser.add_argument("--cross-patient", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--expression-only", action=argparse.BooleanOptionalAction, default=None)
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
    c_rows, models = run_patient_c(
        base,
        knowns,
        seeds,
        ablations=ablations,
        fit_kwargs=fit_kwargs,
        ablation_seeds=args.ablation_seeds,
    )
    profiles = {known: _known_mean(base, known, model.genes) for known, model in models.items()}
    rows = [{"dataset": dataset, **r} for r in c_rows]
    notes = [
        "Ablations not run because the package has no switch for them: ASIGN without "
        "cross-attention, and without graph attention (`fit_asign(n_gat_layers=...)` must "
        "be at least 1). 'network alone' is ASIGN without cross-layer imputation.",
    ]
    if expression:
        rows += run_expression_only(args.her2st, ["A", "B", "D"])
    if cross:
        windows = [float(w) for w in base.uns["asign"]["features"]["windows"]]
        rows += run_cross_patient(args.her2st, args.cache, models, profiles, windows)
        notes.append(
            "Cross-patient: B4's graph is its within-section 8-neighbour graph "
            "(squidpy), as one section has no 3D neighbours."
        )
    frame = pd.DataFrame(rows)
    command = "python benchmarks/accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    return write_report(
        frame, args.out, command=command.strip(), seconds=time.perf_counter() - start, notes=notes
    )


def _known_mean(base, known: str, genes: Sequence[str]) -> pd.Series:
    subset = base[(base.obs["section"] == known).to_numpy()]
    return pd.Series(_truth(subset, list(genes)).mean(axis=0), index=list(genes))


if __name__ == "__main__":
    main()
