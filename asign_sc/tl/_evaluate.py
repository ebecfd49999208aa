"""Honest evaluation of an imputation against measured expression, beside trivial baselines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign_sc._allocator import reuses_freed_memory
from asign_sc._docs import doc_params
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack, validate_counts
from asign_sc._utils import unsanitize_none, update_params
from asign_sc.pp._expression import DEFAULT_TARGET_SUM, gene_positions, normalized_expression
from asign_sc.tl._impute import baseline_prediction, known_expression
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
BASELINES = ("mean", "propagation", "overlap", "similarity", "ridge", "ridge_propagation")
N_VARIABLE = 50
"""``pcc_gene_top50`` averages the per-gene PCC over this many most variable genes."""


@reuses_freed_memory
@doc_params()
def evaluate(
    data: AnnData | SpatialData,
    *,
    sections: Sequence[str],
    key: str = "asign",
    layer: str | None = None,
    counts_layer: str | None = None,
    genes: Sequence[str] | None = None,
    known_sections: Sequence[str] | None = None,
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
    ``pcc_gene_top50``
        ``pcc_gene`` averaged over the 50 scored genes most variable across the known spots
        (across the scored spots when no section is known): the genes whose spatial pattern
        matters most.
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
        The stack holding a prediction and measured counts for ``sections``. Images are not
        needed: a plain AnnData (section column) works.
    sections
        Sections to score: usually the unknown ones, whose counts the prediction never saw.
    key
        ``key_added`` of an imputation of :func:`asign_sc.tl.impute` (``obsm[key]``,
        ``uns[key]['impute']``) to score; ignored when ``layer`` is given.
    layer
        Score ``layers[layer]`` instead, e.g. a prediction made by another tool, on the
        ``log1p`` counts-per-``target_sum`` scale (``target_sum`` 10^4 unless an imputation
        under ``key`` says otherwise).
    {counts_layer} Default: the imputation's.
    genes
        Genes to score; default every gene the imputation filled (for ``layer``: the genes
        with any non-zero prediction on ``sections``).
    known_sections
        Measured sections the baselines start from; default the imputation's. Needed with
        ``layer`` when baselines are asked for.
    baselines
        Any of ``"mean"`` (the known spots' mean profile for every spot), ``"propagation"``,
        ``"overlap"``, ``"similarity"``, ``"ridge"`` and ``"ridge_propagation"`` (see
        :func:`asign_sc.tl.impute`), computed in memory; ``data`` is not changed by them.
    spearman
        Also compute the Spearman correlation per gene.
    {library_key} Default: the imputation's, else ``"section"``.
    key_added
        Per-gene PCC of every method goes to ``var[f"{{key_added}}_pcc_{{method}}"]`` (NaN
        for genes not scored), the summary table and parameters to ``uns[key_added]``.

    Returns
    -------
    A tidy table with columns ``method``, ``section`` (``"all"`` or a section name),
    ``metric``, ``value``, ``n_spots``, ``n_genes``, ``n_genes_undefined``.
    """
    stack = resolve_stack(data, library_key=library_key or Key.obs.library)
    record = _record(stack.table, key, layer)
    if library_key is None and record.get("library_key") not in (None, stack.library_key):
        stack = resolve_stack(data, library_key=str(record["library_key"]))
    table = stack.table
    sections = [sections] if isinstance(sections, str) else [str(s) for s in sections]
    if not sections:
        raise ValueError("sections= is empty: name the sections to score.")
    known = [
        str(s)
        for s in np.atleast_1d(
            known_sections if known_sections is not None else record.get("known_sections", [])
        )
    ]
    _check_baselines(baselines, known, key if layer is None else f"layers[{layer!r}]")
    seen = sorted(set(sections) & set(known))
    if seen:
        logger.warning(
            "Sections %s were known to the imputation: their scores measure reproduction of "
            "the input, not imputation.",
            seen,
        )
    rows = np.concatenate([stack[s].rows for s in sections])
    name, prediction, genes = _prediction(table, key, layer, genes, rows)
    counts_layer = counts_layer if counts_layer is not None else record.get("counts_layer")
    target_sum = float(record.get("target_sum", DEFAULT_TARGET_SUM))
    validate_counts(
        table, counts_layer, rows={s: stack[s].rows for s in sections}, what="scored sections"
    )
    truth = normalized_expression(table, counts_layer, rows, genes, target_sum=target_sum)
    predictions = {name: prediction[rows]}
    values, known_mask = known_expression(
        stack, known, genes, counts_layer=counts_layer, target_sum=target_sum
    )
    for baseline in baselines:
        predictions[baseline] = _baseline(stack, baseline, values, known_mask, record)[rows]
    # the most variable genes where expression is known (the scored truth when none is)
    reference = values[known_mask] if known_mask.any() else truth
    variable = np.argsort(-reference.var(axis=0), kind="stable")[:N_VARIABLE]
    result = _score_all(table, stack, predictions, truth, rows, sections, spearman, variable)
    _write(
        table,
        result,
        predictions,
        truth,
        genes,
        key_added,
        record={
            "key": name,
            "sections": sections,
            "known_sections": known,
            "genes": genes,
            "baselines": list(baselines),
            "counts_layer": counts_layer,
            "target_sum": target_sum,
        },
    )
    return result


def _record(table: AnnData, key: str, layer: str | None) -> dict[str, Any]:
    """The imputation's parameters (``uns[key]['impute']``), with ``None`` restored."""
    params = table.uns.get(Key.uns.params(key), {})
    record = params.get("impute") if hasattr(params, "get") else None
    if layer is None and (record is None or key not in table.obsm):
        raise ValueError(
            f"No imputation under key {key!r} (uns[{key!r}]['impute'] and obsm[{key!r}]); run "
            f"asign_sc.tl.impute(..., key_added={key!r}) first, pass key=, or score a layer "
            "with layer=."
        )
    if layer is not None and (record is None or record.get("layer_added") != layer):
        record = {}
    record = {k: unsanitize_none(v) for k, v in dict(record).items()}
    if "counts_layer" not in record and "layer" in record:  # written before 0.2
        record["counts_layer"] = record["layer"]
    return record


def _check_baselines(baselines: Sequence[str], known: list[str], what: str) -> None:
    unknown_baselines = [b for b in baselines if b not in BASELINES]
    if unknown_baselines:
        raise ValueError(f"Unknown baselines {unknown_baselines}; choose from {list(BASELINES)}.")
    if baselines and not known:
        raise ValueError(
            f"No known section for the baselines {list(baselines)}: the prediction {what} used "
            "none (image-only) or does not say which. Pass known_sections= naming the measured "
            "sections the baselines start from, or baselines=()."
        )


def _prediction(
    table: AnnData, key: str, layer: str | None, genes: Sequence[str] | None, rows: np.ndarray
) -> tuple[str, np.ndarray, list[str]]:
    """Name, ``(n_obs, n_genes)`` prediction and genes of what is scored."""
    if layer is None:
        imputed: pd.DataFrame = table.obsm[key]
        genes = list(imputed.columns) if genes is None else [str(g) for g in genes]
        missing = [g for g in genes if g not in imputed.columns]
        if missing:
            raise ValueError(f"Genes {missing[:5]} were not imputed under key {key!r}.")
        return key, imputed[genes].to_numpy(dtype=float), genes
    if layer not in table.layers:
        raise ValueError(f"layers[{layer!r}] is missing; the table has {list(table.layers)}.")
    matrix = table.layers[layer]
    if genes is None:
        nonzero = np.asarray(abs(matrix[rows]).sum(axis=0)).ravel() > 0
        genes = [str(g) for g in table.var_names[nonzero]]
        if not genes:
            raise ValueError(f"layers[{layer!r}] is all zero on the scored sections.")
    genes = [str(g) for g in genes]
    columns = matrix[:, gene_positions(table, genes)]
    dense = columns.toarray() if hasattr(columns, "toarray") else np.asarray(columns)
    return layer, dense.astype(float), genes


def _baseline(
    stack: SectionStack, name: str, values: np.ndarray, known: np.ndarray, record: dict
) -> np.ndarray:
    return baseline_prediction(
        stack,
        name,
        values,
        known,
        graph_key=record.get("graph_key") or Key.obsp.graph3d,
        features_key=record.get("features_key") or "asign",
        standardize=record.get("standardize_features", "section"),
        spatial_key=record.get("spatial_key") or Key.obsm.spatial_aligned,
        n_iterations=int(record.get("n_iterations") or 10),
    ).values.astype(float)


def _score_all(
    table: AnnData,
    stack: SectionStack,
    predictions: dict[str, np.ndarray],
    truth: np.ndarray,
    rows: np.ndarray,
    sections: list[str],
    spearman: bool,
    variable: np.ndarray,
) -> pd.DataFrame:
    """Scores of every method over all scored spots and, with several sections, per section."""
    section_of = table.obs[stack.library_key].astype(str).to_numpy()[rows]
    frames = []
    for method, pred in predictions.items():
        frames.append(_scores(truth, pred, method, "all", spearman, variable))
        for name in sections if len(sections) > 1 else []:
            mask = section_of == name
            frames.append(_scores(truth[mask], pred[mask], method, name, spearman, variable))
    return pd.concat(frames, ignore_index=True)


def _write(
    table: AnnData,
    result: pd.DataFrame,
    predictions: dict[str, np.ndarray],
    truth: np.ndarray,
    genes: list[str],
    key_added: str,
    *,
    record: dict[str, Any],
) -> None:
    """Per-gene PCC to ``var``, the summary and parameters to ``uns[key_added]``; log them."""
    positions = gene_positions(table, genes)
    columns = []
    for method, pred in predictions.items():
        column = np.full(table.n_vars, np.nan)
        column[positions] = _gene_pcc(truth, pred)
        columns.append(f"{key_added}_pcc_{method}")
        table.var[columns[-1]] = column
    overall = result[result["section"] == "all"].pivot(
        index="method", columns="metric", values="value"
    )
    summary = {m: overall.loc[m].to_dict() for m in overall.index}
    table.uns[Key.uns.params(key_added)] = {}
    update_params(table, key_added, "summary", summary)
    update_params(table, key_added, "params", record)
    logger.info(
        "Scored %s on %d spots x %d genes of %s: per-gene PCC %s. Added var %s and uns[%r].",
        record["key"],
        len(truth),
        len(genes),
        record["sections"],
        ", ".join(f"{m} {overall.loc[m, 'pcc_gene']:.3f}" for m in overall.index),
        columns,
        key_added,
    )


def _gene_pcc(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-gene PCC; 0 where the prediction is constant, NaN where the truth is."""
    pcc = pcc_per_gene(truth, pred)
    flat = _varies(np.asarray(truth, float), 0) & ~_varies(np.asarray(pred, float), 0)
    pcc[flat] = 0.0
    return pcc


def _scores(
    truth: np.ndarray,
    pred: np.ndarray,
    method: str,
    section: str,
    spearman: bool,
    variable: np.ndarray,
) -> pd.DataFrame:
    gene_pcc = _gene_pcc(truth, pred)
    metrics = {
        "pcc_gene": gene_pcc,
        f"pcc_gene_top{N_VARIABLE}": gene_pcc[variable],
        "pcc_spot": pcc_per_spot(truth, pred),
        "mse": mse_per_gene(truth, pred),
        "mae": mae_per_gene(truth, pred),
    }
    if spearman:
        rho = spearman_per_gene(truth, pred)
        rho[np.isnan(rho) & ~np.isnan(gene_pcc)] = 0.0
        metrics["spearman_gene"] = rho
    rows = []
    for metric, values in metrics.items():
        finite = values[np.isfinite(values)]
        per_gene = metric != "pcc_spot"
        rows.append(
            {
                "method": method,
                "section": section,
                "metric": metric,
                "value": float(finite.mean()) if finite.size else float("nan"),
                "n_spots": int(truth.shape[0]),
                "n_genes": int(values.size if per_gene else truth.shape[1]),
                "n_genes_undefined": int(np.isnan(values).sum()) if per_gene else 0,
            }
        )
    return pd.DataFrame(rows)
