"""Cohort fits (the paper's protocol) against one known section alone: the benchmark report.

The paper's sample-level protocol trains one model on every section of the training samples
plus the one known section of each target sample, then imputes the target's other sections.
This benchmark asks whether those extra samples help over the target's known section alone
(``tl.fit_asign(known_sections={sample: sections}, sample_key="sample")`` against
``tl.fit_asign(known_sections=[known])`` on the target sample only; same genes, same
settings, same seeds). Score: ``tl.evaluate`` on the target's unknown sections (per-gene PCC
primary), the propagation baseline beside it (it needs no model, so it is the same in both).

1. Synthetic cohorts (``asign_sc.datasets.synthetic_stack``, one tumour per seed): the target
   tumour and two training tumours, each registered, embedded and connected on its own.
   Two cohorts: *one disease* (``programs_seed`` shared: tissue types express the same genes
   in every tumour; shapes, layouts and gradients differ) and *unrelated tumours* (each
   tumour draws its own gene programs: the images look alike, the expression differs).
2. her2st: patient C (C2-C6, known C4, C2/C3/C5/C6 scored) with B4 (patient B's one imaged
   section) added as a second, fully known sample. Patient C comes prepared from the cache
   of ``benchmarks/accuracy.py`` (registered and embedded; read, never written) with its 3D
   graph rebuilt by ``gr.build_3d_graph`` defaults; B4 is embedded with patient C's windows
   and connected within the section (``build_3d_graph``'s within-section edges: a 3D graph
   needs two sections, and B4 has no imaged neighbour). Genes: the intersection of the two
   patients' genes, the 250 of highest mean count over C4.

Run from the repository root::

    python benchmarks/cohort.py            # both parts, 2 seeds (about an hour on 2 cores)
    python benchmarks/cohort.py --tiny     # a tiny synthetic cohort (seconds; the smoke test)
    python benchmarks/cohort.py --settings her2st --out /tmp/part2   # one comparison
    python benchmarks/cohort.py --report-from part1/cohort.csv part2/cohort.csv

Writes ``benchmarks/results/cohort.md`` and ``cohort.csv`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_CACHE, HER2ST, as_table, prepare

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE = "sample"
TARGET_KNOWN = "S2"
#: Full mode: three tumours of four sections each (the target first). One network per fit
#: (``n_models=1``; the default ensemble of 3 triples the time on 2 shared cores): the
#: comparison is between training sets, both sides fitted alike.
FULL = {
    "tumour_seeds": (11, 12, 13),
    "stack": {"n_sections": 4, "n_spots_per_section": 150, "image_size": 512, "n_genes": 50},
    "fit": {"n_models": 1},
}
#: --tiny: two tumours of three small sections, short fits (a smoke test, not a result).
TINY = {
    "tumour_seeds": (11, 12),
    "stack": {"n_sections": 3, "n_spots_per_section": 40, "image_size": 160, "n_genes": 12},
    "fit": {"epochs": 5, "n_models": 1},
}
PROGRAMS_SEED = 7
SETTINGS = ("one-disease", "her2st", "unrelated")

logger = logging.getLogger("cohort")


# -- building a cohort ------------------------------------------------------------------------
def with_sample(table, sample: str, *, prefix: bool = True):
    """A prepared table labelled as one sample; sections (and spots) renamed ``<sample>_<s>``.

    Section names must be unique across the samples of one object; the feature windows
    recorded per section follow the new names.
    """
    table = table.copy()
    rename = {
        str(s): (f"{sample}_{s}" if prefix else str(s)) for s in table.obs["section"].unique()
    }
    order = [rename[str(s)] for s in table.obs["section"].cat.categories if str(s) in rename]
    table.obs["section"] = pd.Categorical(
        table.obs["section"].astype(str).map(rename), categories=order
    )
    table.obs_names = [f"{sample}:{name}" for name in table.obs_names]
    table.obs[SAMPLE] = sample
    table.uns["spatial"] = {rename[k]: v for k, v in table.uns["spatial"].items() if k in rename}
    features = dict(table.uns["asign"]["features"])
    features["windows_px"] = {rename[k]: v for k, v in features["windows_px"].items()}
    table.uns["asign"] = {"features": features}
    return table


def combine(tables: Sequence):
    """One AnnData holding several samples: genes in common, graphs as disjoint blocks."""
    import anndata as ad
    import scipy.sparse as sp

    out = ad.concat(tables, join="inner", merge="first")
    order = [c for t in tables for c in t.obs["section"].cat.categories]
    out.obs["section"] = pd.Categorical(out.obs["section"].astype(str), categories=order)
    out.obs[SAMPLE] = pd.Categorical(out.obs[SAMPLE].astype(str))
    for key in ("spatial3d_connectivities", "spatial3d_distances"):
        out.obsp[key] = sp.block_diag([t.obsp[key] for t in tables], format="csr")
    out.uns["spatial"] = {k: v for t in tables for k, v in t.uns["spatial"].items()}
    features = dict(tables[0].uns["asign"]["features"])
    features["windows_px"] = {
        k: v for t in tables for k, v in t.uns["asign"]["features"]["windows_px"].items()
    }
    out.uns["asign"] = {"features": features}
    return out


def synthetic_cohort(config: Mapping, *, shared_programs: bool):
    """Tumours of ``synthetic_stack`` (one per seed), each prepared on its own, combined."""
    from asign_sc.datasets import synthetic_stack

    tables = []
    for i, seed in enumerate(config["tumour_seeds"]):
        sdata, _ = synthetic_stack(
            seed=seed,
            programs_seed=PROGRAMS_SEED if shared_programs else None,
            **config["stack"],
        )
        tables.append(with_sample(prepare(sdata), f"T{i + 1}"))
    return combine(tables)


def within_section_graph(table):
    """``build_3d_graph``'s within-section edges of a one-section table (8 nearest spots,
    weight ``pitch / max(distance, pitch)``): the graph of a sample with one section."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    from asign_sc.gr._search import within_neighbors

    rows, cols, dist = within_neighbors(cKDTree(table.obsm["spatial"]), 8)
    pitch = float(np.median(dist[dist > 0]))
    shape = (table.n_obs, table.n_obs)
    weights = pitch / np.maximum(dist, pitch)
    table.obsp["spatial3d_connectivities"] = sp.csr_matrix((weights, (rows, cols)), shape=shape)
    table.obsp["spatial3d_distances"] = sp.csr_matrix((dist, (rows, cols)), shape=shape)
    return table


def her2st_cohort(her2st: Path, cache: Path, work: Path):
    """Patient C (cached preparation, graph rebuilt) and B4 as a second sample."""
    import anndata as ad

    from asign_sc import gr, tl
    from asign_sc.io import read_her2st

    cached = cache / "her2st_C_prepared.h5ad"
    if not cached.exists():
        raise FileNotFoundError(
            f"{cached} is missing: run `python benchmarks/accuracy.py --quick` first (it "
            "prepares patient C: registration and image features)."
        )
    c = ad.read_h5ad(cached)  # read only; the file is never written here
    gr.build_3d_graph(c)  # today's defaults (the cached graph may be older)
    windows = [float(w) for w in c.uns["asign"]["features"]["windows"]]
    b4 = read_her2st(her2st, patient="B", sections=["B4"])
    tl.extract_features(
        b4, windows=windows, device="cpu", show_progress_bar=False, cache_dir=work / "features"
    )
    b4 = within_section_graph(as_table(b4))
    b4.obsm["spatial_aligned"] = b4.obsm["spatial"]
    return combine([with_sample(c, "C", prefix=False), with_sample(b4, "B", prefix=False)])


# -- one comparison ---------------------------------------------------------------------------
def compare(
    cohort,
    *,
    target: str,
    known: str,
    seeds: Sequence[int],
    fit: Mapping,
    setting: str,
    n_top_genes: int = 250,
) -> list[dict]:
    """Fit on the target's known section alone and on the cohort; score the target."""
    from asign_sc import pp, tl

    alone = cohort[(cohort.obs[SAMPLE] == target).to_numpy()].copy()
    alone.obs["section"] = alone.obs["section"].cat.remove_unused_categories()
    unknown = [str(s) for s in alone.obs["section"].cat.categories if s != known]
    genes = pp.select_genes(
        alone, known_sections=[known], n_top_genes=min(n_top_genes, alone.n_vars)
    )
    samples = cohort.obs.groupby(SAMPLE, observed=True)["section"].unique()
    by_sample = {
        str(sample): [known] if sample == target else [str(s) for s in sections]
        for sample, sections in samples.items()
    }
    rows = []
    for seed in seeds:
        for training, data, known_sections, sample_key in (
            ("target's known section alone", alone, [known], None),
            ("cohort: + every section of the other samples", cohort, by_sample, SAMPLE),
        ):
            start = time.perf_counter()
            model = tl.fit_asign(
                data,
                known_sections=known_sections,
                sample_key=sample_key,
                genes=genes,
                seed=seed,
                device="cpu",
                show_progress_bar=False,
                **fit,
            )
            seconds = time.perf_counter() - start
            tl.impute(data, model, device="cpu")
            scores = tl.evaluate(data, sections=unknown, baselines=("propagation",))
            overall = scores[scores["section"] == "all"]
            for method, group in overall.groupby("method"):
                values = dict(zip(group["metric"], group["value"], strict=True))
                rows.append(
                    {
                        "setting": setting,
                        "training": training if method == "asign" else "(no model)",
                        "method": method,
                        "seed": seed,
                        "n_training_spots": int(
                            data.obs["section"].isin(model.known_sections).sum()
                        ),
                        "pcc_gene": values["pcc_gene"],
                        "pcc_spot": values["pcc_spot"],
                        "mse": values["mse"],
                        "fit_seconds": round(seconds, 1),
                    }
                )
            logger.info(
                "%s | %s | seed %d: per-gene PCC %.3f (fit %.0f s)",
                setting,
                training,
                seed,
                overall.query("method == 'asign' and metric == 'pcc_gene'")["value"].iloc[0],
                seconds,
            )
    return rows


# -- report -----------------------------------------------------------------------------------
def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds of each setting and training choice."""
    model = results[results["method"] == "asign"]
    baseline = results[results["method"] != "asign"].drop_duplicates(["setting", "seed"])
    table = pd.concat([model, baseline.assign(training="propagation baseline (no model)")])
    order = {setting: i for i, setting in enumerate(results["setting"].unique())}
    table = table.sort_values("setting", key=lambda column: column.map(order), kind="stable")
    grouped = table.groupby(["setting", "training"], sort=False)
    return grouped.agg(
        pcc_gene_mean=("pcc_gene", "mean"),
        pcc_gene_min=("pcc_gene", "min"),
        pcc_gene_max=("pcc_gene", "max"),
        pcc_spot_mean=("pcc_spot", "mean"),
        mse_mean=("mse", "mean"),
        n_seeds=("seed", "nunique"),
        n_training_spots=("n_training_spots", "first"),
    ).reset_index()


def verdict(summary: pd.DataFrame, setting: str) -> str:
    """One plain sentence: does the cohort beat the known section alone (beyond the seeds)?"""
    rows = summary[summary["setting"] == setting].set_index("training")
    alone = rows.loc[rows.index.str.startswith("target's")].iloc[0]
    cohort = rows.loc[rows.index.str.startswith("cohort")].iloc[0]
    gain = cohort["pcc_gene_mean"] - alone["pcc_gene_mean"]
    separated = (
        cohort["pcc_gene_min"] > alone["pcc_gene_max"]
        or cohort["pcc_gene_max"] < alone["pcc_gene_min"]
    )
    if separated and gain > 0:
        word = "helps"
    elif separated:
        word = "hurts"
    else:
        word = "makes no difference beyond the spread over seeds"
    if min(cohort["n_seeds"], alone["n_seeds"]) < 2:
        word = ("seems to help" if gain > 0 else "seems to hurt") + " (one seed: no spread known)"
    return (
        f"**{setting}**: the cohort {word} (per-gene PCC {cohort['pcc_gene_mean']:.3f} vs "
        f"{alone['pcc_gene_mean']:.3f} for the known section alone, {gain:+.3f})."
    )


def write_report(results: pd.DataFrame, out: Path, *, fit: Mapping) -> Path:
    """``cohort.md`` and ``cohort.csv``; ``results`` has a row per method, setting and seed
    (with the ``command``, ``load`` at its start and ``minutes`` of the run that made it)."""
    summary = summarise(results)
    runs = results.groupby(["command", "load"], sort=False)["minutes"].max().reset_index()
    lines = [
        "# Cohort fits vs one known section alone",
        "",
        "Generated by `benchmarks/cohort.py` (see its docstring for the protocol); do not edit.",
        "",
        *[
            f"- run: `{r['command']}` ("
            + ("time not recorded" if pd.isna(r["minutes"]) else f"{r['minutes']:.0f} min")
            + f"; load average at its start {r['load']})"
            for _, r in runs.iterrows()
        ],
        f"- machine: {platform.processor() or platform.machine()}, {_cpus()} CPUs",
        "- score: the target sample's unknown sections, `tl.evaluate` (per-gene PCC across "
        "spots, primary; per-spot PCC across genes; MSE on log1p counts per 10^4); mean, min "
        "and max over model seeds.",
        "- fits: `tl.fit_asign` defaults, except "
        + (", ".join(f"`{k}={v}`" for k, v in fit.items()) or "nothing")
        + "; the same genes (the target's known section's top genes) on both sides.",
        "",
        "## Findings",
        "",
        *[f"- {verdict(summary, s)}" for s in summary["setting"].unique()],
        "",
        "## Scores",
        "",
        "| setting | training | per-gene PCC (min-max) | per-spot PCC | MSE | seeds | "
        "training spots |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        lines.append(
            f"| {r['setting']} | {r['training']} | {r['pcc_gene_mean']:.3f} "
            f"({r['pcc_gene_min']:.3f}-{r['pcc_gene_max']:.3f}) | {r['pcc_spot_mean']:.3f} | "
            f"{r['mse_mean']:.3f} | {r['n_seeds']} | "
            + ("" if r["training"].startswith("propagation") else f"{r['n_training_spots']}")
            + " |"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cohort.md"
    path.write_text("\n".join(lines) + "\n")
    results.to_csv(out / "cohort.csv", index=False)
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load() -> str:
    import os

    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny synthetic cohort only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="which comparisons to run (default: all)",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="only write the report from the cohort.csv of earlier runs (e.g. run in parts)",
    )
    parser.add_argument("--her2st", type=Path, default=HER2ST)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--work", type=Path, default=Path("/tmp/asign_sc_cohort"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # small tensors on shared cores
    start, load = time.perf_counter(), _load()
    config = TINY if args.tiny else FULL
    command = "python benchmarks/cohort.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_from:
        results = pd.concat([pd.read_csv(path) for path in args.report_from], ignore_index=True)
        for column in ("command", "load"):  # csv files of older versions lack them
            results[column] = results.get(column, pd.Series(dtype=object)).fillna("not recorded")
        results["minutes"] = results.get("minutes", pd.Series(dtype=float))
        path = write_report(results, args.out, fit=config["fit"])
        logger.info("wrote %s from %s", path, [str(p) for p in args.report_from])
        return results
    synthetic = {"one-disease": ("synthetic, one disease", True)}
    if not args.tiny:
        synthetic["unrelated"] = ("synthetic, unrelated tumours", False)
    jobs = [
        (
            setting,
            lambda shared=shared: synthetic_cohort(config, shared_programs=shared),
            "T1",
            f"T1_{TARGET_KNOWN}",
            config["fit"],
        )
        for key, (setting, shared) in synthetic.items()
        if args.tiny or key in args.settings
    ]
    if not args.tiny and "her2st" in args.settings:
        # before the unrelated tumours: the real data matters more
        jobs.insert(
            min(1, len(jobs)),
            (
                "her2st: patient C (known C4) + B4",
                lambda: her2st_cohort(args.her2st, args.cache, args.work),
                "C",
                "C4",
                config["fit"],
            ),
        )
    rows: list[dict] = []
    for setting, build, target, known, fit in jobs:
        rows += compare(
            build(), target=target, known=known, seeds=args.seeds, fit=fit, setting=setting
        )
        # written after every setting, so a long run shows what it has
        results = pd.DataFrame(rows).assign(
            command=command.strip(), load=load, minutes=(time.perf_counter() - start) / 60
        )
        path = write_report(results, args.out, fit=config["fit"])
        logger.info("wrote %s", path)
    return results


if __name__ == "__main__":
    main()
