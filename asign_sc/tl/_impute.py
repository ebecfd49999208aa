"""``impute``: write a fitted ASIGN model's (or a baseline's) expression into the stack."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from asign_sc._allocator import reuses_freed_memory
from asign_sc._docs import doc_params
from asign_sc._errors import InvalidStackError
from asign_sc._keys import LEVELS, Key
from asign_sc._stack import SectionStack, resolve_stack, validate_counts
from asign_sc._utils import copy_data, update_params
from asign_sc.models import _baselines
from asign_sc.models._config import Standardize
from asign_sc.models._data import StackData, load_graph, standardize_by_section
from asign_sc.models._model import ASIGNModel
from asign_sc.pp._expression import (
    DEFAULT_TARGET_SUM,
    gene_positions,
    known_rows,
    normalized_expression,
    select_genes,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["impute"]

logger = logging.getLogger(__name__)

Method = Literal[
    "asign", "network", "propagation", "overlap", "similarity", "ridge", "ridge_propagation"
]
MODEL_METHODS = ("asign", "network")
BASELINES = ("propagation", "overlap", "similarity", "ridge", "ridge_propagation")


@dataclass
class _Result:
    values: np.ndarray
    uncertainty: np.ndarray
    genes: list[str]
    params: dict[str, Any] = field(default_factory=dict)


@reuses_freed_memory
@doc_params()
def impute(
    data: AnnData | SpatialData,
    model: ASIGNModel | Sequence[ASIGNModel] | None = None,
    *,
    method: Method = "asign",
    known_sections: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 250,
    counts_layer: str | None = None,
    library_key: str | None = None,
    sample_key: str | None = None,
    features_key: str | None = None,
    graph_key: str | None = None,
    standardize_features: Standardize = "section",
    spatial_key: str = Key.obsm.spatial_aligned,
    spot_radius: float | None = None,
    n_iterations: int | None = None,
    n_neighbors: int = 20,
    device: str | torch.device = "auto",
    layer_added: str = Key.layers.imputed,
    key_added: str = "asign",
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Impute expression of every spot of a stack from its known sections.

    Expression is on the normalised scale of :func:`asign_sc.tl.fit_asign` (``log1p`` of
    counts per ``target_sum``). Spots of known sections keep their measured values, except
    with ``method="network"``, which predicts every spot from the images alone.

    ``method`` chooses the imputation; only the first two need a fitted ``model``:

    ``"asign"``
        MSAGNet + cross-layer imputation (the full method). Uncertainty: the standard
        deviation over the model's ensemble members (``fit_asign(n_models=...)``); with a
        single network, the disagreement ``|network - propagation|`` (NaN where the
        propagation never reached). 0 on known spots.
    ``"network"``
        MSAGNet alone. Uncertainty as for ``"asign"``.
    ``"propagation"``
        Cross-layer imputation alone over the 3D graph (``α = 1``, no images): eq. 5 with
        ``n_iterations`` steps (default 10). Spots it never reaches get the mean profile of
        the known spots (logged). Uncertainty: the spread of the neighbours' values. Needs
        no image: a plain AnnData with a 3D graph is enough.
    ``"overlap"``
        Each spot takes the value of the nearest known spot in the aligned frame
        (``obsm[spatial_key]``), i.e. the known spot its disc overlaps most. Uncertainty:
        ``|nearest - second nearest|``.
    ``"similarity"``
        Mean of the ``n_neighbors`` known spots most similar by spot image features (cosine,
        after per-section standardisation). Uncertainty: their standard deviation.
    ``"ridge"``
        Closed-form ridge regression from the pooled image features of all three window
        levels (standardised per section), fitted on the known spots, the penalty chosen by
        exact leave-one-out. A strong image-only baseline. Uncertainty: each gene's
        leave-one-out error.
    ``"ridge_propagation"``
        Label spreading over the 3D graph seeded with the ridge prediction (``a = 0.5``, 50
        steps), known spots clamped: image and neighbourhood together, without a network.
        Uncertainty: how far spreading moved the ridge prediction.

    Several models (a list, e.g. fitted on different image features of the same stack:
    ``fit_asign(features_key=...)``) are imputed one by one and averaged, a feature-view
    ensemble; their uncertainty is the total standard deviation over all their members
    (within-model variance plus the variance between the models).

    Parameters
    ----------
    data
        AnnData or SpatialData: the stack to impute (the one the model was fitted on, or a
        new one whose features came from the same encoder).
    model
        A fitted model (:func:`asign_sc.tl.fit_asign` or :meth:`ASIGNModel.load`), or a list
        of models fitted on the same known sections and genes (each may read its own
        ``features_key``), whose predictions are averaged. Defaults below come from the
        first.
    method
        See above.
    known_sections
        Sections whose measured expression is used; default the model's training sections.
        Required for the baselines. With ``method="network"`` it may be empty (``[]``):
        the network predicts from images and graph alone, e.g. for a stack of another
        patient; that is also the default when the model's sections are not in the stack.
    genes
        Genes to impute; default the model's genes, or for the baselines the
        ``n_top_genes`` of highest mean count over the known spots.
    n_top_genes
        Number of genes for the baselines when ``genes`` is not given.
    {counts_layer} Default: the model's.
    {library_key} Default: the model's, else ``"section"``.
    sample_key
        Column of ``obs`` naming the sample; known spots only inform spots of their sample
        (``"overlap"``, ``"similarity"``, the ridge of ``"ridge"``, ``"ridge_propagation"`` and
        of ASIGN's linear member; the 3D graph has no edges across samples). Default: the
        model's (:func:`~asign_sc.tl.fit_asign` with ``sample_key``).
    {features_key} Default: the model's, else ``"asign"``.
    {graph_key} Default: the model's, else ``"spatial3d"``.
    standardize_features
        Per-section feature standardisation for ``"similarity"`` (a model uses its own).
    spatial_key
        ``obsm`` key of the aligned spot centres, for ``"overlap"``.
    spot_radius
        Spot radius of a plain AnnData without squidpy's scalefactors (``"overlap"`` uses it
        to count spots that overlap no known spot).
    n_iterations
        Propagation steps for ``"propagation"``; default the model's, else 10.
    n_neighbors
        ``k`` of ``"similarity"`` (paper: 20).
    {device}
    layer_added
        ``layers[layer_added]``: ``n_obs x n_vars`` sparse matrix of the imputed genes;
        genes outside the imputation are 0 there (not stored) and marked ``False`` in
        ``var[f"{{key_added}}_modelled"]``.
    key_added
        ``obsm[key_added]`` (DataFrame of the imputed genes),
        ``obsm[f"{{key_added}}_uncertainty"]`` and ``uns[key_added]["impute"]`` (parameters;
        other entries of ``uns[key_added]`` are kept).
    {copy}

    Returns
    -------
    The modified copy if ``copy=True``, else ``None``.
    """
    if method not in MODEL_METHODS + BASELINES:
        raise ValueError(
            f"method must be one of {list(MODEL_METHODS + BASELINES)}, got {method!r}."
        )
    if method in MODEL_METHODS and model is None:
        raise ValueError(
            f"method={method!r} needs a fitted model: model = asign_sc.tl.fit_asign(...), or "
            f"ASIGNModel.load(path). The baselines {list(BASELINES)} need none."
        )
    models = _as_models(model)
    model = models[0] if models else None
    if model is not None and method in BASELINES:
        logger.info("method=%r is a baseline; the model is used only for its defaults.", method)
    data = copy_data(data) if copy else data
    stack = resolve_stack(
        data,
        library_key=library_key or (model.library_key if model else Key.obs.library),
        sample_key=sample_key or (model.sample_key if model else None),
        spot_radius=spot_radius,
    )
    table = stack.table
    known_sections = _known_sections(stack, model, method, known_sections)
    if counts_layer is None and model is not None:
        counts_layer = model.counts_layer
    if method in MODEL_METHODS:
        _check_known_for_model(stack, method, known_sections)
        # one read of the measured expression: every model shares genes and target_sum
        values, known = known_expression(
            stack,
            known_sections,
            model.genes,
            counts_layer=counts_layer,
            target_sum=model.training.target_sum,
        )
        results = [_impute_model(stack, m, method, values, known, genes, device) for m in models]
        result = results[0] if len(results) == 1 else _average_models(results, models)
    else:
        if genes is None:
            genes = (
                model.genes
                if model is not None
                else select_genes(
                    data,
                    known_sections=known_sections,
                    n_top_genes=min(n_top_genes, table.n_vars),
                    counts_layer=counts_layer,
                    library_key=stack.library_key,
                )
            )
        target_sum = model.training.target_sum if model is not None else DEFAULT_TARGET_SUM
        values, known = known_expression(
            stack, known_sections, genes, counts_layer=counts_layer, target_sum=target_sum
        )
        graph_key = graph_key or (model.graph_key if model else Key.obsp.graph3d)
        features_key = features_key or (model.features_key if model else "asign")
        baseline = baseline_prediction(
            stack,
            method,
            values,
            known,
            graph_key=graph_key,
            features_key=features_key,
            standardize=standardize_features,
            spatial_key=spatial_key,
            n_iterations=n_iterations or (model.architecture.n_iterations if model else 10),
            n_neighbors=n_neighbors,
        )
        result = _Result(
            baseline.values,
            baseline.uncertainty,
            [str(g) for g in genes],
            {**baseline.params, "target_sum": target_sum},
        )
    _write(
        table,
        result,
        method,
        known_sections,
        layer_added,
        key_added,
        counts_layer,
        stack.library_key,
    )
    return data if copy else None


def _as_models(model: ASIGNModel | Sequence[ASIGNModel] | None) -> list[ASIGNModel]:
    """``model`` as a list, checked to be averageable (same genes, sections and scale)."""
    if model is None:
        return []
    if isinstance(model, ASIGNModel):
        return [model]
    if isinstance(model, str | bytes) or not isinstance(model, Sequence):
        raise TypeError(
            f"model must be a fitted ASIGNModel or a list of them, got {type(model).__name__}."
        )
    models = list(model)
    if not models:
        raise ValueError("model is an empty list; pass at least one fitted ASIGNModel.")
    for i, m in enumerate(models):
        if not isinstance(m, ASIGNModel):
            raise TypeError(f"model[{i}] is a {type(m).__name__}, not a fitted ASIGNModel.")
    first = models[0]
    for i, m in enumerate(models[1:], start=1):
        for what, mine, theirs in (
            ("known_sections", m.known_sections, first.known_sections),
            ("genes", m.genes, first.genes),
            ("library_key", m.library_key, first.library_key),
            ("sample_key", m.sample_key, first.sample_key),
            ("counts_layer", m.counts_layer, first.counts_layer),
            ("target_sum", m.training.target_sum, first.training.target_sum),
        ):
            if mine != theirs:
                if what == "genes":
                    shown = f"model[{i}] has {len(mine)} genes, {len(set(mine) - set(theirs))} "
                    shown += "of them not modelled by model[0] (or in another order)"
                else:
                    shown = f"model[{i}] has {mine!r}, model[0] {theirs!r}"
                raise ValueError(
                    f"Models to average must share their {what}: {shown}. Fit them on the same "
                    "stack and known sections (fit_asign(genes=model[0].genes, ...)), changing "
                    "only features_key or the seed."
                )
    return models


def _average_models(results: list[_Result], models: list[ASIGNModel]) -> _Result:
    """Mean of several models' predictions; uncertainty the total std over their members.

    Law of total variance over models with equal weight: the mean of the members' variances
    within each model plus the variance of the models' means.
    """
    n = len(results)
    values = np.zeros_like(results[0].values, dtype=np.float64)
    squares = np.zeros_like(values)
    within = np.zeros_like(values)
    for result in results:
        values += result.values
        squares += np.square(result.values, dtype=np.float64)
        within += np.square(result.uncertainty, dtype=np.float64)
    values /= n
    between = np.maximum(squares / n - np.square(values), 0.0)
    uncertainty = np.sqrt(within / n + between)
    per_model = [r.params for r in results]
    params = {
        **per_model[0],
        "features_key": per_model[0]["features_key"],
        "features_keys": [p["features_key"] for p in per_model],
        "n_models": int(sum(p["n_models"] for p in per_model)),
        "n_averaged_models": n,
        "uncertainty": "total_std_over_models",
        "fraction_unknown_reached": min(p["fraction_unknown_reached"] for p in per_model),
        "mean_gate": float(np.mean([p["mean_gate"] for p in per_model])),
        # a mapping, not a list: AnnData writes nested dicts, not lists of dicts
        "models": {str(i): p for i, p in enumerate(per_model)},
    }
    logger.info(
        "Averaged %d models (features %s, %d networks in all).",
        n,
        params["features_keys"],
        params["n_models"],
    )
    return _Result(
        values.astype(np.float32), uncertainty.astype(np.float32), results[0].genes, params
    )


def _known_sections(
    stack: SectionStack,
    model: ASIGNModel | None,
    method: str,
    known_sections: Sequence[str] | str | None,
) -> list[str]:
    """The measured sections to use: given, else the model's (none for a new stack)."""
    if known_sections is None:
        if model is None:
            raise ValueError(f"method={method!r} needs known_sections= (the measured sections).")
        known_sections = model.known_sections
        if method == "network" and not set(known_sections) <= set(stack.names):
            # A new stack (e.g. another patient) without the training sections: the network
            # predicts from images and graph alone and needs no measured spots.
            logger.info(
                "The model's known sections %s are not in this stack: imputing from images "
                "alone (method='network', no known sections).",
                known_sections,
            )
            known_sections = []
    if isinstance(known_sections, str):
        known_sections = [known_sections]
    return [str(s) for s in known_sections]


def known_expression(
    stack: SectionStack,
    known_sections: Sequence[str],
    genes: Sequence[str],
    *,
    counts_layer: str | None,
    target_sum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(n_obs, n_genes)`` normalised measured values on known rows (0 elsewhere), and the mask."""
    table = stack.table
    values = np.zeros((table.n_obs, len(genes)), dtype=np.float32)
    known = np.zeros(table.n_obs, dtype=bool)
    if not known_sections:
        return values, known
    rows = known_rows(stack, known_sections)
    validate_counts(
        table, counts_layer, rows={s: stack[s].rows for s in known_sections}, what="known sections"
    )
    values[rows] = normalized_expression(table, counts_layer, rows, genes, target_sum=target_sum)
    known[rows] = True
    return values, known


def baseline_prediction(
    stack: SectionStack,
    method: str,
    values: np.ndarray,
    known: np.ndarray,
    *,
    graph_key: str,
    features_key: str,
    standardize: Standardize,
    spatial_key: str,
    n_iterations: int = 10,
    n_neighbors: int = 20,
) -> _baselines.BaselineResult:
    """Read what a baseline needs from the stack's table and run it (no model)."""
    table = stack.table
    samples = stack.samples()
    groups = (
        None
        if len(samples) <= 1
        else [np.concatenate([s.rows for s in sections]) for sections in samples.values()]
    )
    if method == "propagation":
        result = _baselines.propagation(
            load_graph(table, graph_key), values, known, n_iterations=n_iterations
        )
        result.params["graph_key"] = graph_key
    elif method == "overlap":
        if spatial_key not in table.obsm:
            raise InvalidStackError(
                f"obsm[{spatial_key!r}] is missing: the overlap baseline needs spot centres in "
                "a common (aligned) frame. Run asign_sc.tl.register_sections(...) first, or "
                "pass spatial_key= naming pre-aligned coordinates."
            )
        radius = float(np.median([s.spot_radius for s in stack]))
        result = _baselines.nearest_known(
            table.obsm[spatial_key], values, known, spot_radius=radius, groups=groups
        )
        result.params["spatial_key"] = spatial_key
    elif method == "similarity":
        features = pooled_features(stack, features_key, standardize, levels=("spot",))
        result = _baselines.similar_known(
            features, values, known, n_neighbors=n_neighbors, groups=groups
        )
        result.params.update({"features_key": features_key, "standardize_features": standardize})
    elif method in ("ridge", "ridge_propagation"):
        features = pooled_features(stack, features_key, standardize)
        result = _ridge_by_sample(stack, features, values, known, groups)
        result.params.update({"features_key": features_key, "standardize_features": standardize})
        if method == "ridge_propagation":
            alpha = result.params["alpha"]
            result = _baselines.label_spreading(load_graph(table, graph_key), result.values, known)
            result.params.update({"ridge_alpha": alpha, "graph_key": graph_key})
    elif method == "mean":
        result = _baselines.mean_profile(values, known)
    else:
        raise ValueError(f"Unknown baseline {method!r}; choose from {['mean', *BASELINES]}.")
    return result


def _ridge_by_sample(
    stack: SectionStack,
    features: np.ndarray,
    values: np.ndarray,
    known: np.ndarray,
    groups: list[np.ndarray] | None,
) -> _baselines.BaselineResult:
    """The ridge baseline, fitted within each sample on that sample's known spots only."""
    if groups is None:
        return _baselines.ridge(features, values, known)
    out = values.astype(np.float32, copy=True)
    uncertainty = np.zeros_like(out)
    alphas = {}
    for sample, rows in zip(stack.samples(), groups, strict=True):
        if not known[rows].any():
            raise InvalidStackError(
                f"Sample {sample!r} has no known section: the ridge (and ASIGN's linear member) "
                "fits each sample on its own measured spots. Name one of its sections in "
                "known_sections=, or use method='network' (or ridge_member=0) for it."
            )
        part = _baselines.ridge(features[rows], values[rows], known[rows])
        out[rows], uncertainty[rows] = part.values, part.uncertainty
        alphas[str(sample)] = part.params["alpha"]
    return _baselines.BaselineResult(out, uncertainty, {"alpha": alphas})


def pooled_features(
    stack: SectionStack,
    features_key: str,
    standardize: Standardize,
    *,
    levels: Sequence[str] = LEVELS,
) -> np.ndarray:
    """Pooled image embeddings of ``levels`` side by side, standardised per section if asked.

    A level stored as a token grid only (``obsm[f"X_{key}_{level}_tokens"]``, as the network
    reads it) is pooled as the mean of its tokens.
    """
    table = stack.table
    blocks = []
    for level in levels:
        key = Key.obsm.features(features_key, level)
        tokens = f"{key}_tokens"
        if key in table.obsm:
            block = np.array(table.obsm[key], dtype=np.float32, copy=True)
        elif tokens in table.obsm:
            block = np.asarray(table.obsm[tokens], dtype=np.float32).mean(axis=1)
        else:
            raise InvalidStackError(
                f"obsm[{key!r}] is missing: this baseline needs the image features of "
                "asign_sc.tl.extract_features(...); run it first or pass features_key=."
            )
        if standardize == "section":
            standardize_by_section(block, stack, inplace=True)
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


# -- model methods --------------------------------------------------------------------------
def _check_known_for_model(stack: SectionStack, method: str, known_sections: list[str]) -> None:
    """The known sections a model method needs: in the stack, and some unless images alone."""
    missing = [s for s in known_sections if s not in stack.names]
    if missing:
        raise InvalidStackError(
            f"known_sections {missing} are not sections of this stack {stack.names}; pass "
            "known_sections= naming its measured sections."
        )
    if not known_sections and method != "network":
        raise InvalidStackError(
            "known_sections is empty: method='asign' propagates measured expression, so name "
            "the measured section(s), or use method='network' to predict from images alone."
        )


def _impute_model(
    stack: SectionStack,
    model: ASIGNModel,
    method: str,
    values: np.ndarray,
    known: np.ndarray,
    genes: Sequence[str] | None,
    device: str | torch.device,
) -> _Result:
    """One model's prediction from the measured ``values`` on ``known`` rows."""
    stack_data = StackData.from_table(
        stack.table,
        stack,
        features_key=model.features_key,
        graph_key=model.graph_key,
        standardize=model.training.standardize_features,
    )
    out = model.predict(stack_data.inputs, values, known, device=device)
    pred = out["prediction"] if method == "asign" else out["spot"]
    std_key = "prediction_std" if method == "asign" else "spot_std"
    if std_key in out:
        uncertainty_kind, uncertainty = "ensemble_std", out[std_key]
    else:
        uncertainty_kind = "network_propagation_disagreement"
        uncertainty = np.abs(out["spot"] - out["propagated"])
        uncertainty[out["coverage"] == 0] = np.nan
    weight = model.architecture.ridge_member if method == "asign" else 0.0
    if weight > 0:
        pred, uncertainty = _add_ridge_member(stack, model, pred, uncertainty, values, known)
    if method == "asign":
        uncertainty[known] = 0.0
    kept_genes = list(model.genes)
    if genes is not None:  # a subset: its columns copied; all genes are written as they are
        absent = [str(g) for g in genes if str(g) not in model.genes]
        if absent:
            raise ValueError(f"The model does not predict {absent[:5]} ({len(absent)} genes).")
        keep = [model.genes.index(str(g)) for g in genes]
        pred, uncertainty = pred[:, keep], uncertainty[:, keep]
        kept_genes = [model.genes[i] for i in keep]
    unknown = ~known
    return _Result(
        values=pred.astype(np.float32, copy=False),
        uncertainty=uncertainty.astype(np.float32, copy=False),
        genes=kept_genes,
        params={
            "target_sum": model.training.target_sum,
            "n_iterations": model.architecture.n_iterations,
            "features_key": model.features_key,
            "standardize_features": model.training.standardize_features,
            "graph_key": model.graph_key,
            "model_known_sections": model.known_sections,
            "n_models": model.n_models,
            "uncertainty": uncertainty_kind,
            "fraction_unknown_reached": float((out["coverage"][unknown] > 0).mean())
            if unknown.any()
            else 1.0,
            "mean_gate": float(out["gate"][unknown].mean()) if unknown.any() else float("nan"),
            "ridge_member": weight,
        },
    )


def _add_ridge_member(
    stack: SectionStack,
    model: ASIGNModel,
    networks: np.ndarray,
    uncertainty: np.ndarray,
    values: np.ndarray,
    known: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Average the networks' prediction with ridge + label spreading (the linear member).

    The ridge is fitted here, on the known spots of this stack (closed form, a fraction of a
    second), so it needs nothing stored in the model. It is deterministic, so the ensemble's
    spread shrinks by the networks' weight.
    """
    weight = model.architecture.ridge_member
    linear = baseline_prediction(
        stack,
        "ridge_propagation",
        values,
        known,
        graph_key=model.graph_key,
        features_key=model.features_key,
        standardize=model.training.standardize_features,
        spatial_key=Key.obsm.spatial_aligned,
    ).values
    return weight * linear + (1 - weight) * networks, (1 - weight) * uncertainty


def _dense_rows_as_csr(values: np.ndarray, cols: np.ndarray, n_vars: int) -> sp.csr_matrix:
    """``(n, n_vars)`` CSR matrix holding ``values`` in columns ``cols`` (zeros dropped).

    Built from its CSR arrays: every row has the same columns, so the index pointer is a
    range, and no coordinate arrays are needed (through ``coo_matrix`` they took two int64
    arrays and a conversion, about 2 GB at 200,000 spots x 250 genes).
    """
    n, g = values.shape
    order = np.argsort(cols)  # sorted column indices within each row: canonical CSR
    nnz = n * g
    index_dtype = np.int32 if max(nnz, n_vars) < np.iinfo(np.int32).max else np.int64
    matrix = sp.csr_matrix(
        (
            np.ascontiguousarray(values[:, order], dtype=np.float32).ravel(),
            np.tile(cols[order].astype(index_dtype), n),
            np.arange(0, nnz + 1, g, dtype=index_dtype),
        ),
        shape=(n, n_vars),
    )
    matrix.eliminate_zeros()
    return matrix


# -- writing --------------------------------------------------------------------------------
def _write(
    table: AnnData,
    result: _Result,
    method: str,
    known_sections: list[str],
    layer_added: str,
    key_added: str,
    counts_layer: str | None,
    library_key: str,
) -> None:
    cols = gene_positions(table, result.genes)
    matrix = _dense_rows_as_csr(result.values, cols, table.n_vars)
    table.layers[layer_added] = matrix
    modelled = np.zeros(table.n_vars, dtype=bool)
    modelled[cols] = True
    table.var[Key.var.modelled_by(key_added)] = modelled
    table.obsm[key_added] = pd.DataFrame(result.values, index=table.obs_names, columns=result.genes)
    unc_key = Key.obsm.uncertainty(key_added)
    table.obsm[unc_key] = pd.DataFrame(
        result.uncertainty, index=table.obs_names, columns=result.genes
    )
    update_params(
        table,
        key_added,
        "impute",
        {
            "method": method,
            "known_sections": known_sections,
            "genes": result.genes,
            "counts_layer": counts_layer,
            "layer_added": layer_added,
            "library_key": library_key,
            **result.params,
        },
    )
    logger.info(
        "Imputed %d genes with method=%r from %s: added layers[%r], obsm[%r], obsm[%r], "
        "var[%r], uns[%r]['impute'].",
        len(result.genes),
        method,
        known_sections,
        layer_added,
        key_added,
        unc_key,
        Key.var.modelled_by(key_added),
        Key.uns.params(key_added),
    )
