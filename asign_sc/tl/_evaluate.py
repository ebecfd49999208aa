"""Honest evaluation of an imputation against measured expression, beside trivial baselines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign_sc._keys import Key
from asign_sc._stack import resolve_stack, validate_counts
from asign_sc._utils import is_spatialdata, sanitize_uns
from asign_sc.pp._expression import DEFAULT_TARGET_SUM, counts_matrix, gene_positions, log_normalize
from asign_sc.tl._metrics import (
    _varies,
    mae_per_gene,
    mse_per_gene,
    pcc_per_gene,
    pcc_per_spot,
    spearman_per_gene,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)

#: Baselines that need no model: the known spots' mean profile, and the imputation baselines
#: of :func:`asign_sc.tl.impute`.
BASELINES = ("mean", "propagation", "overlap", "similarity")


def evaluate(
    data: AnnData | SpatialData,
    *,
    sections: Sequence[str],
    key: str = "asign",
    truth_layer: str | None = None,
    genes: Sequence[str] | None = None,
    baselines: Sequence[str] = ("mean", "propagation"),
    spearman: bool = False,
    library_key: str | None = None,
    key_added: str = "asign_eval",
) -> pd.DataFrame:
    """Score an imputation on sections with measured expression, with baselines beside it.

    Truth is the measured counts of ``sections`` on the scale the imputation predicts in
    (``log1p`` of counts per ``target_sum``, library size over all genes), and the same
    genes. Metrics, each for the method and every baseline, on the same spots and genes:

    ``pcc_gene``
        Pearson correlation across spots per gene, averaged over genes (primary: does the
        prediction follow each gene's spatial variation?). A gene constant in the truth cannot
        be scored: it is left out of the average and counted in ``n_genes_undefined``. A
        prediction constant over the spots (such as the mean profile) captures none of the
        variation and scores 0 for that gene.
    ``pcc_spot``
        Pearson correlation across genes per spot, averaged over spots (the ASIGN paper's
        metric; dominated by the average expression profile).
    ``mse``, ``mae``
        Mean squared / absolute error over spots and genes.
    ``spearman_gene``
        With ``spearman=True``: rank correlation across spots per gene, averaged.

    Parameters
    ----------
    data
        The stack holding an imputation (:func:`asign_sc.tl.impute`) and measured counts for
        ``sections``.
    sections
        Sections to score: usually the unknown ones, whose counts the imputation never saw.
    key
        ``key_added`` of the imputation to score (``obsm[key]``, ``uns[key]['impute']``).
    truth_layer
        Layer with the measured counts; default the imputation's counts layer, else ``X``.
    genes
        Genes to score; default every gene the imputation filled.
    baselines
        Any of ``"mean"`` (the known spots' mean profile for every spot), ``"propagation"``,
        ``"overlap"`` and ``"similarity"`` (see :func:`asign_sc.tl.impute`). Baselines are
        computed on a light copy; ``data`` is not changed by them.
    spearman
        Also compute the Spearman correlation per gene.
    library_key
        Column of ``obs`` naming sections; default the imputation's.
    key_added
        Per-gene PCC of every method goes to ``var[f"{key_added}_pcc_{method}"]`` (NaN for
        genes not scored), the summary table and parameters to ``uns[key_added]``.

    Returns
    -------
    A tidy table with columns ``method``, ``section`` (``"all"`` or a section name),
    ``metric``, ``value``, ``n_spots``, ``n_genes``, ``n_genes_undefined``.
    """
    table = resolve_stack(data, library_key=library_key or Key.obs.library).table
    record = table.uns.get(Key.uns.params(key), {}).get("impute")
    if record is None or key not in table.obsm:
        raise ValueError(
            f"No imputation under key {key!r} (uns[{key!r}]['impute'] and obsm[{key!r}]); run "
            f"asign_sc.tl.impute(..., key_added={key!r}) first, or pass key=."
        )
    library_key = library_key or str(record.get("library_key", Key.obs.library))
    stack = resolve_stack(data, library_key=library_key)
    sections = [sections] if isinstance(sections, str) else [str(s) for s in sections]
    if not sections:
        raise ValueError("sections= is empty: name the sections to score.")
    known = [str(s) for s in np.atleast_1d(record["known_sections"])]
    seen = sorted(set(sections) & set(known))
    if seen:
        logger.warning(
            "Sections %s were known to the imputation: their scores measure reproduction of "
            "the input, not imputation.",
            seen,
        )
    unknown_baselines = [b for b in baselines if b not in BASELINES]
    if unknown_baselines:
        raise ValueError(f"Unknown baselines {unknown_baselines}; choose from {list(BASELINES)}.")
    if baselines and not known:
        raise ValueError(
            f"The imputation in obsm[{key!r}] used no known section (image-only), so the "
            f"baselines {list(baselines)}, which start from measured spots, have nothing to "
            "start from: pass baselines=()."
        )
    imputed: pd.DataFrame = table.obsm[key]
    genes = list(imputed.columns) if genes is None else [str(g) for g in genes]
    missing = [g for g in genes if g not in imputed.columns]
    if missing:
        raise ValueError(f"Genes {missing[:5]} were not imputed under key {key!r}.")
    counts_layer = truth_layer if truth_layer is not None else _none(record.get("layer"))
    target_sum = float(record.get("target_sum", DEFAULT_TARGET_SUM))

    rows = np.concatenate([stack[s].rows for s in sections])
    validate_counts(table, layer=counts_layer, rows=rows)
    truth = _normalised(table, counts_layer, rows, genes, target_sum)
    predictions = {key: imputed[genes].to_numpy(dtype=float)[rows]}
    for baseline in baselines:
        predictions[baseline] = _baseline(
            data, stack, baseline, known, genes, counts_layer, target_sum, record
        )[rows]

    section_of = table.obs[library_key].astype(str).to_numpy()[rows]
    frames = []
    for method, pred in predictions.items():
        frames.append(_scores(truth, pred, method, "all", spearman))
        for name in sections if len(sections) > 1 else []:
            mask = section_of == name
            frames.append(_scores(truth[mask], pred[mask], method, name, spearman))
    result = pd.concat(frames, ignore_index=True)

    positions = gene_positions(table, genes)
    for method, pred in predictions.items():
        column = np.full(table.n_vars, np.nan)
        column[positions] = _gene_pcc(truth, pred)
        table.var[f"{key_added}_pcc_{method}"] = column
    overall = result[result["section"] == "all"].pivot(
        index="method", columns="metric", values="value"
    )
    table.uns[Key.uns.params(key_added)] = sanitize_uns(
        {
            "summary": {m: overall.loc[m].to_dict() for m in overall.index},
            "params": {
                "key": key,
                "sections": sections,
                "known_sections": known,
                "genes": genes,
                "baselines": list(baselines),
                "truth_layer": counts_layer,
                "target_sum": target_sum,
            },
        }
    )
    logger.info(
        "Scored %s on %d spots x %d genes of %s: per-gene PCC %s. Added var[%r], uns[%r].",
        key,
        len(rows),
        len(genes),
        sections,
        ", ".join(f"{m} {overall.loc[m, 'pcc_gene']:.3f}" for m in overall.index),
        f"{key_added}_pcc_*",
        key_added,
    )
    return result


def _none(value: Any) -> Any:
    return None if value is None or value == "None" else value


def _normalised(
    table: AnnData, layer: str | None, rows: np.ndarray, genes: list[str], target_sum: float
) -> np.ndarray:
    counts = counts_matrix(table, layer, rows)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return log_normalize(counts[:, gene_positions(table, genes)], totals, target_sum=target_sum)


def _baseline(
    data: AnnData | SpatialData,
    stack: Any,
    name: str,
    known: list[str],
    genes: list[str],
    layer: str | None,
    target_sum: float,
    record: dict,
) -> np.ndarray:
    table = stack.table
    if name == "mean":
        rows = np.concatenate([stack[s].rows for s in known])
        profile = _normalised(table, layer, rows, genes, target_sum).mean(axis=0)
        return np.broadcast_to(profile, (table.n_obs, len(genes)))
    from asign_sc.tl._impute import impute

    light = _light_copy(data)
    impute(
        light,
        method=name,
        known_sections=known,
        genes=genes,
        layer=layer,
        library_key=stack.library_key,
        graph_key=_none(record.get("graph_key")),
        features_key=_none(record.get("features_key")),
        **(
            {"standardize_features": _none(record["standardize_features"])}
            if "standardize_features" in record
            else {}
        ),
        layer_added="baseline",
        key_added="baseline",
    )
    return _table_of(light).obsm["baseline"][genes].to_numpy(dtype=float)


def _light_copy(data: AnnData | SpatialData) -> AnnData | SpatialData:
    """The table and spots without images: enough for the baselines, cheap to copy."""
    if is_spatialdata(data):
        from spatialdata import SpatialData

        table = data.tables[Key.sdata.table]
        return SpatialData(shapes=dict(data.shapes), tables={Key.sdata.table: table.copy()})
    return data.copy()


def _table_of(data: AnnData | SpatialData) -> AnnData:
    return data.tables[Key.sdata.table] if is_spatialdata(data) else data


def _gene_pcc(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-gene PCC; 0 where the prediction is constant, NaN where the truth is."""
    pcc = pcc_per_gene(truth, pred)
    flat = _varies(np.asarray(truth, float), 0) & ~_varies(np.asarray(pred, float), 0)
    pcc[flat] = 0.0
    return pcc


def _scores(
    truth: np.ndarray, pred: np.ndarray, method: str, section: str, spearman: bool
) -> pd.DataFrame:
    gene_pcc = _gene_pcc(truth, pred)
    metrics = {
        "pcc_gene": gene_pcc,
        "pcc_spot": pcc_per_spot(truth, pred),
        "mse": mse_per_gene(truth, pred),
        "mae": mae_per_gene(truth, pred),
    }
    if spearman:
        rho = spearman_per_gene(truth, pred)
        rho[np.isnan(rho) & ~np.isnan(gene_pcc)] = 0.0
        metrics["spearman_gene"] = rho
    undefined = int(np.isnan(gene_pcc).sum())
    rows = []
    for metric, values in metrics.items():
        finite = values[np.isfinite(values)]
        rows.append(
            {
                "method": method,
                "section": section,
                "metric": metric,
                "value": float(finite.mean()) if finite.size else float("nan"),
                "n_spots": int(truth.shape[0]),
                "n_genes": int(truth.shape[1]),
                "n_genes_undefined": undefined if metric.endswith("_gene") else 0,
            }
        )
    return pd.DataFrame(rows)
