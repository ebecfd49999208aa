"""Gene selection, normalisation and multi-level expression targets (paper §IV, eq. 10).

Expression is modelled on the scale ``log1p(counts / library_size * target_sum)``, where the
library size is a spot's total count over *all* genes of the table (scanpy's
``normalize_total`` followed by ``log1p``; TRIPLEX's "proportional normalisation followed by
a log transformation"). Region and global targets (eq. 10) sum the raw counts of the spots
inside a window, then are normalised the same way, with the summed library sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["expression_targets", "log_normalize", "normalized_expression", "select_genes"]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_SUM = 1e4
DEFAULT_WINDOWS = {"region": 512.0, "global": 1024.0}
"""Region and global window sides in full-resolution pixels (paper §IV)."""


def log_normalize(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    totals: np.ndarray,
    *,
    target_sum: float = DEFAULT_TARGET_SUM,
) -> np.ndarray:
    """``log1p(counts / totals * target_sum)`` as a dense ``float32`` array.

    Parameters
    ----------
    counts
        ``(n, n_genes)`` raw counts of the modelled genes.
    totals
        ``(n,)`` library sizes (total counts over all genes); rows with a total of 0 give 0.
    target_sum
        Counts per spot after scaling (``1e4``: counts per 10k).
    """
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    totals = np.asarray(totals, dtype=np.float64).reshape(-1)
    if totals.shape[0] != dense.shape[0]:
        raise ValueError(f"totals has {totals.shape[0]} entries for {dense.shape[0]} rows.")
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(dense * scale[:, None]).astype(np.float32)


def counts_matrix(table: AnnData, counts_layer: str | None, rows: np.ndarray) -> sp.csr_matrix:
    """Raw counts of ``rows`` (CSR, float64), validated: finite and non-negative."""
    layer = counts_layer
    if layer is None:
        matrix = table.X
        where = "X"
    else:
        if layer not in table.layers:
            raise InvalidStackError(
                f"layers[{layer!r}] is missing (layers: {list(table.layers)}). Pass "
                "counts_layer= naming the layer of raw counts, or counts_layer=None to use X."
            )
        matrix = table.layers[layer]
        where = f"layers[{layer!r}]"
    if matrix is None:
        raise InvalidStackError(f"{where} is empty; raw counts of the known sections are needed.")
    sub = sp.csr_matrix(matrix[rows], dtype=np.float64)
    data = sub.data
    if not np.all(np.isfinite(data)):
        raise InvalidStackError(
            f"{where} has NaN or infinite values in the known sections; expression must be "
            "measured raw counts there."
        )
    if (data < 0).any():
        raise InvalidStackError(
            f"{where} has negative values in the known sections; asign_sc needs raw counts "
            "(it normalises them itself). Pass counts_layer= naming the raw counts."
        )
    return sub


def normalized_expression(
    table: AnnData,
    counts_layer: str | None,
    rows: np.ndarray,
    genes: Sequence[str],
    *,
    target_sum: float = DEFAULT_TARGET_SUM,
) -> np.ndarray:
    """``log1p`` of counts per ``target_sum`` of ``rows`` x ``genes`` (library size: all genes).

    The one definition of the scale every fit, imputation and evaluation works on.
    """
    counts = counts_matrix(table, counts_layer, rows)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return log_normalize(counts[:, gene_positions(table, genes)], totals, target_sum=target_sum)


def known_rows(stack: SectionStack, known_sections: Sequence[str]) -> np.ndarray:
    if isinstance(known_sections, str):
        known_sections = [known_sections]
    if len(known_sections) == 0:
        raise InvalidStackError(
            "known_sections is empty: name the section(s) with measured expression."
        )
    missing = [s for s in known_sections if s not in stack.names]
    if missing:
        raise InvalidStackError(
            f"known_sections {missing} are not sections of the stack {stack.names} "
            f"(values of obs[{stack.library_key!r}])."
        )
    return np.sort(np.concatenate([stack[s].rows for s in known_sections]))


def resolve_known_sections(
    data: AnnData | SpatialData,
    known_sections: Sequence[str] | str | Mapping[str, Sequence[str] | str],
    *,
    library_key: str = Key.obs.library,
    sample_key: str | None = None,
) -> tuple[SectionStack, list[str], dict[str, list[str]] | None]:
    """The stack and its measured sections, checked per sample for a cohort.

    Parameters
    ----------
    data
        AnnData or SpatialData with one stack, or with several samples (``sample_key``).
    known_sections
        Section names, or with ``sample_key`` a mapping ``{sample: section(s)}`` (every
        section of a training sample, one section of a target sample).
    library_key
        ``obs`` column naming sections.
    sample_key
        ``obs`` column naming samples. Every sample of the data needs at least one known
        section: it anchors that sample's propagation (the 3D graph has no edges across
        samples).

    Returns
    -------
    The resolved stack, the known sections (in the order given) and, with ``sample_key``,
    ``{sample: known sections}`` in the stack's sample order (``None`` without).
    """
    stack = resolve_stack(data, library_key=library_key, sample_key=sample_key)
    sections_of = {str(k): [s.name for s in v] for k, v in stack.samples().items()}
    if isinstance(known_sections, Mapping):
        if sample_key is None:
            raise ValueError(
                "known_sections is a mapping {sample: sections}; pass sample_key= naming the "
                "obs column of samples, or give a list of section names."
            )
        given = {str(k): _names(v) for k, v in known_sections.items()}
        names = [s for sections in given.values() for s in sections]
        unknown = [k for k in given if k not in sections_of]
        if unknown:
            raise ValueError(
                f"known_sections names sample(s) {unknown} that obs[{sample_key!r}] does not "
                f"have; its samples are {list(sections_of)}."
            )
    else:
        names = _names(known_sections)
        given = None
    known_rows(stack, names)  # empty or unknown sections: a clear error
    duplicated = sorted({s for s in names if names.count(s) > 1})
    if duplicated:
        raise ValueError(f"known_sections names {duplicated} more than once.")
    if sample_key is None:
        return stack, names, None
    if given is not None:
        for sample, sections in given.items():
            foreign = {s: str(stack[s].sample) for s in sections if s not in sections_of[sample]}
            if foreign or not sections:
                raise ValueError(
                    f"known_sections[{sample!r}] = {sections}: "
                    + (
                        "no section given; name at least one measured section of the sample."
                        if not sections
                        else f"{foreign} (section: its sample) belong to other samples; "
                        f"sample {sample!r} has sections {sections_of[sample]}."
                    )
                )
    known = set(names)
    samples = {k: [s for s in v if s in known] for k, v in sections_of.items()}
    orphans = [k for k, v in samples.items() if not v]
    if orphans:
        raise ValueError(
            f"Sample(s) {orphans} of obs[{sample_key!r}] have no known section, so nothing "
            "anchors their imputation. Name one measured section of each target sample "
            "(its sections: "
            + "; ".join(f"{k}: {sections_of[k]}" for k in orphans)
            + "), or leave those samples out of the data."
        )
    return stack, names, samples


def _names(sections: Sequence[str] | str) -> list[str]:
    return [sections] if isinstance(sections, str) else [str(s) for s in sections]


def select_genes(
    data: AnnData | SpatialData,
    *,
    known_sections: Sequence[str],
    n_top_genes: int = 250,
    counts_layer: str | None = None,
    library_key: str = Key.obs.library,
) -> list[str]:
    """The ``n_top_genes`` genes of highest mean raw count over the known spots.

    This is ST-Net's selection, which the paper follows. Ties keep the order of ``var``.

    Parameters
    ----------
    data
        AnnData or SpatialData with raw counts.
    known_sections
        Sections with measured expression; only their spots are read.
    n_top_genes
        Number of genes to keep.
    counts_layer
        Layer with raw counts; ``None`` for ``X``.
    library_key
        Column of ``obs`` naming each spot's section.

    Returns
    -------
    Gene names in decreasing order of mean count.
    """
    stack = resolve_stack(data, library_key=library_key)
    table = stack.table
    rows = known_rows(stack, known_sections)
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}.")
    if n_top_genes > table.n_vars:
        raise ValueError(
            f"n_top_genes={n_top_genes} exceeds the {table.n_vars} genes of the table."
        )
    counts = counts_matrix(table, counts_layer, rows)
    mean = np.asarray(counts.mean(axis=0)).ravel()
    order = np.argsort(-mean, kind="stable")[:n_top_genes]
    return [str(g) for g in table.var_names[order]]


def window_members(spatial: np.ndarray, size: float) -> sp.csr_matrix:
    """Sparse ``(n, n)`` 0/1 window membership of spots.

    Entry ``(i, j)`` is 1 when spot ``j``'s centre lies in the square window of side ``size``
    centred on spot ``i`` (within ``size / 2`` along x and y; ``i`` itself included).
    """
    tree = cKDTree(spatial)
    pairs = tree.query_pairs(size / 2, p=np.inf, output_type="ndarray")
    n = len(spatial)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))


def level_targets(
    stack: SectionStack,
    rows: np.ndarray,
    counts: sp.csr_matrix,
    totals: np.ndarray,
    genes_idx: np.ndarray,
    *,
    windows: Mapping[str, float | Mapping[str, float]],
    target_sum: float,
) -> dict[str, np.ndarray]:
    """Normalised targets of ``rows`` at the spot level and every window level.

    ``windows`` maps a level to a window side in pixels, or to ``{section: side}``.
    """
    position = pd.Series(np.arange(len(rows)), index=rows)
    selected = counts[:, genes_idx]
    out = {"spot": log_normalize(selected, totals, target_sum=target_sum)}
    for level, sizes in windows.items():
        level_counts = np.zeros(selected.shape, dtype=np.float64)
        level_totals = np.zeros(len(rows), dtype=np.float64)
        for section in stack:
            in_rows = np.isin(section.rows, rows)
            if not in_rows.any():
                continue
            size = float(sizes[section.name] if isinstance(sizes, Mapping) else sizes)
            if not np.isfinite(size) or size <= 0:
                raise ValueError(
                    f"The {level} window of section {section.name!r} must be a positive size "
                    f"in pixels, got {size}."
                )
            local = position[section.rows[in_rows]].to_numpy()
            members = window_members(section.spatial[in_rows], size)
            level_counts[local] = (members @ selected[local]).toarray()
            level_totals[local] = members @ totals[local]
        out[level] = log_normalize(level_counts, level_totals, target_sum=target_sum)
    return out


def expression_targets(
    data: AnnData | SpatialData,
    *,
    genes: Sequence[str],
    sections: Sequence[str],
    counts_layer: str | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    region_size: float = DEFAULT_WINDOWS["region"],
    global_size: float = DEFAULT_WINDOWS["global"],
    library_key: str = Key.obs.library,
) -> dict[str, pd.DataFrame]:
    """Normalised spot, region and global expression of measured sections (eq. 10).

    The region (global) target of a spot sums the raw counts of every spot of the same
    section whose centre lies in the square window of side ``region_size``
    (``global_size``) pixels centred on it, then normalises the sums like a spot (module
    docstring). Windows are measured in the section's own full-resolution pixels, like the
    image windows of :func:`asign_sc.tl.extract_features`.

    Parameters
    ----------
    data
        AnnData or SpatialData with raw counts.
    genes
        Genes to return (e.g. from :func:`select_genes`).
    sections
        Measured sections to read.
    counts_layer
        Layer with raw counts; ``None`` for ``X``.
    target_sum
        Counts per spot after library-size scaling.
    region_size, global_size
        Window sides in full-resolution pixels.
    library_key
        Column of ``obs`` naming each spot's section.

    Returns
    -------
    ``{"spot", "region", "global"}`` DataFrames (spots of ``sections`` x ``genes``).
    """
    stack = resolve_stack(data, library_key=library_key)
    rows = known_rows(stack, sections)
    genes_idx = gene_positions(stack.table, genes)
    counts = counts_matrix(stack.table, counts_layer, rows)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    targets = level_targets(
        stack,
        rows,
        counts,
        totals,
        genes_idx,
        windows={"region": region_size, "global": global_size},
        target_sum=target_sum,
    )
    index = stack.table.obs_names[rows]
    return {k: pd.DataFrame(v, index=index, columns=list(genes)) for k, v in targets.items()}


def gene_positions(table: AnnData, genes: Sequence[str]) -> np.ndarray:
    """Column positions of ``genes`` in ``table.var_names``; raises on missing or repeated genes."""
    genes = [str(g) for g in genes]
    if len(genes) == 0:
        raise ValueError("genes is empty.")
    if len(set(genes)) != len(genes):
        raise ValueError("genes has duplicates.")
    if not table.var_names.is_unique:
        raise InvalidStackError("var_names are not unique; run adata.var_names_make_unique().")
    idx = table.var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        raise InvalidStackError(
            f"{len(missing)} genes are not in var_names, e.g. {missing[:5]}. Use genes "
            "present in the table (or the genes the model was trained on)."
        )
    return idx
