"""``impute``: write a fitted ASIGN model's (or a baseline's) expression into the stack."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc._utils import copy_data
from asign_sc.models._asign import ASIGNModel, resolve_device
from asign_sc.models._propagation import adjacency_tensor, propagate_labels
from asign_sc.pp._expression import DEFAULT_TARGET_SUM, gene_positions, known_rows, select_genes
from asign_sc.tl._fit import (
    Standardize,
    build_inputs,
    known_values,
    load_graph,
    reduce_inputs,
    standardize_by_section,
    update_params,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["impute"]

logger = logging.getLogger(__name__)

Method = Literal["asign", "network", "propagation", "overlap", "similarity"]
MODEL_METHODS = ("asign", "network")
BASELINES = ("propagation", "overlap", "similarity")


@dataclass
class _Result:
    values: np.ndarray
    uncertainty: np.ndarray
    genes: list[str]
    params: dict[str, Any] = field(default_factory=dict)


def impute(
    data: AnnData | SpatialData,
    model: ASIGNModel | None = None,
    *,
    method: Method = "asign",
    known_sections: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 250,
    layer: str | None = None,
    library_key: str | None = None,
    sample_key: str | None = None,
    features_key: str | None = None,
    graph_key: str | None = None,
    standardize_features: Standardize = "section",
    spatial_key: str = Key.obsm.spatial_aligned,
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
        the known spots (logged). Uncertainty: the spread of the neighbours' values.
    ``"overlap"``
        Each spot takes the value of the nearest known spot in the aligned frame
        (``obsm[spatial_key]``), i.e. the known spot its disc overlaps most. Uncertainty:
        ``|nearest - second nearest|``.
    ``"similarity"``
        Mean of the ``n_neighbors`` known spots most similar by spot image features (cosine,
        after per-section standardisation). Uncertainty: their standard deviation.

    Parameters
    ----------
    data
        AnnData or SpatialData: the stack to impute (the one the model was fitted on, or a
        new one whose features came from the same encoder).
    model
        A fitted model (:func:`asign_sc.tl.fit_asign` or :meth:`ASIGNModel.load`).
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
    layer
        Layer with raw counts of the known sections; default the model's, else ``X``.
    library_key
        Column of ``obs`` naming each spot's section; default the model's, else ``"section"``.
    sample_key
        Column of ``obs`` naming the sample; known spots only inform spots of their sample
        (``"overlap"``, ``"similarity"``; the 3D graph has no edges across samples).
    features_key
        ``key_added`` of the image features; default the model's, else ``"asign"``.
    graph_key
        ``key_added`` of the 3D graph; default the model's, else ``"spatial3d"``.
    standardize_features
        Per-section feature standardisation for ``"similarity"`` (a model uses its own).
    spatial_key
        ``obsm`` key of the aligned spot centres, for ``"overlap"``.
    n_iterations
        Propagation steps for ``"propagation"``; default the model's, else 10.
    n_neighbors
        ``k`` of ``"similarity"`` (paper: 20).
    device
        Device of the model methods.
    layer_added
        ``layers[layer_added]``: ``n_obs x n_vars`` sparse matrix, imputed genes filled,
        other genes 0; ``var[f"{key_added}_modelled"]`` marks the imputed genes.
    key_added
        ``obsm[key_added]`` (DataFrame of the imputed genes),
        ``obsm[f"{key_added}_uncertainty"]`` and ``uns[key_added]["impute"]`` (parameters;
        other entries of ``uns[key_added]`` are kept).
    copy
        Return a modified copy instead of writing into ``data``.

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
    if model is not None and method in BASELINES:
        logger.info("method=%r is a baseline; the model is used only for its defaults.", method)
    data = copy_data(data) if copy else data
    settings = model.settings if model is not None else {}
    library_key = library_key or settings.get("library_key", Key.obs.library)
    if sample_key is None:
        sample_key = settings.get("sample_key")
    stack = resolve_stack(data, library_key=library_key, sample_key=sample_key)
    table = stack.table
    if known_sections is None:
        if model is None:
            raise ValueError(f"method={method!r} needs known_sections= (the measured sections).")
        known_sections = settings["known_sections"]
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
    known_sections = [str(s) for s in known_sections]
    if layer is None:
        layer = settings.get("normalization", {}).get("layer")
    features_key = features_key or settings.get("features", {}).get("key", "asign")
    graph_key = graph_key or settings.get("graph", {}).get("key", "spatial3d")
    if n_iterations is None:
        n_iterations = settings.get("architecture", {}).get("n_iterations", 10)

    if method in MODEL_METHODS:
        result = _impute_model(table, stack, model, method, known_sections, genes, layer, device)
    else:
        if genes is None:
            genes = (
                model.genes
                if model is not None
                else select_genes(
                    data,
                    known_sections=known_sections,
                    n_top_genes=min(n_top_genes, table.n_vars),
                    layer=layer,
                    library_key=library_key,
                )
            )
        target_sum = settings.get("normalization", {}).get("target_sum", DEFAULT_TARGET_SUM)
        rows = known_rows(stack, known_sections)
        measured = known_values(
            table, stack, rows=rows, genes=genes, layer=layer, target_sum=target_sum
        )["spot"]
        known = np.zeros(table.n_obs, dtype=bool)
        known[rows] = True
        values = np.zeros((table.n_obs, len(genes)), dtype=np.float32)
        values[rows] = measured
        if method == "propagation":
            result = _propagation(table, graph_key, values, known, n_iterations)
        elif method == "overlap":
            result = _overlap(table, stack, spatial_key, values, known)
        else:
            result = _similarity(
                table, stack, features_key, standardize_features, values, known, n_neighbors
            )
        result.genes = [str(g) for g in genes]
        result.params.update({"target_sum": target_sum})
    _write(table, result, method, known_sections, layer_added, key_added, layer)
    return data if copy else None


# -- model methods --------------------------------------------------------------------------
def _impute_model(
    table: AnnData,
    stack: SectionStack,
    model: ASIGNModel,
    method: str,
    known_sections: list[str],
    genes: Sequence[str] | None,
    layer: str | None,
    device: str | torch.device,
) -> _Result:
    settings = model.settings
    model_genes = model.genes
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
    if known_sections:
        rows = known_rows(stack, known_sections)
        measured = known_values(
            table,
            stack,
            rows=rows,
            genes=model_genes,
            layer=layer,
            target_sum=settings["normalization"]["target_sum"],
        )["spot"]
    else:
        rows = np.empty(0, dtype=np.int64)
        measured = np.empty((0, len(model_genes)), dtype=np.float32)
    inputs = build_inputs(
        table,
        stack,
        features_key=settings["features"]["key"],
        graph_key=settings["graph"]["key"],
        standardize=settings["features"]["standardize"],
    )
    arch = settings["architecture"]
    mismatch = {k: (v, arch[k]) for k, v in inputs.dims.items() if v != arch[k]}
    if mismatch:
        raise InvalidStackError(
            f"Feature sizes of this stack differ from the model's (stack, model): {mismatch}. "
            "Extract features with the encoder the model was trained with."
        )
    dev = resolve_device(device)
    net = model.net.to(dev).eval()
    inputs = reduce_inputs(net, inputs.to(dev))
    known = torch.zeros(table.n_obs, dtype=torch.bool, device=dev)
    known[torch.as_tensor(rows, device=dev)] = True
    values = torch.zeros(table.n_obs, len(model_genes), device=dev)
    values[torch.as_tensor(rows, device=dev)] = torch.as_tensor(measured, device=dev)
    with torch.no_grad():
        out = net(*inputs.args(), values, known)
    coverage = out["coverage"].cpu().numpy()
    network = out["spot"].cpu().numpy()
    propagated = out["propagated"].cpu().numpy()
    pred = out["prediction"].cpu().numpy() if method == "asign" else network
    std_key = "prediction_std" if method == "asign" else "spot_std"
    if std_key in out:
        uncertainty_kind = "ensemble_std"
        uncertainty = out[std_key].cpu().numpy()
    else:
        uncertainty_kind = "network_propagation_disagreement"
        uncertainty = np.abs(network - propagated)
        uncertainty[coverage == 0] = np.nan
    if method == "asign":
        uncertainty[rows] = 0.0
    keep = np.arange(len(model_genes))
    if genes is not None:
        genes = [str(g) for g in genes]
        absent = [g for g in genes if g not in model_genes]
        if absent:
            raise ValueError(f"The model does not predict {absent[:5]} ({len(absent)} genes).")
        keep = np.array([model_genes.index(g) for g in genes])
    unknown = ~known.cpu().numpy()
    return _Result(
        values=pred[:, keep].astype(np.float32),
        uncertainty=uncertainty[:, keep].astype(np.float32),
        genes=[model_genes[i] for i in keep],
        params={
            "target_sum": settings["normalization"]["target_sum"],
            "n_iterations": arch["n_iterations"],
            "features_key": settings["features"]["key"],
            "standardize_features": settings["features"]["standardize"],
            "graph_key": settings["graph"]["key"],
            "model_known_sections": settings["known_sections"],
            "n_models": len(net.members),
            "uncertainty": uncertainty_kind,
            "fraction_unknown_reached": float((coverage[unknown] > 0).mean())
            if unknown.any()
            else 1.0,
            "mean_gate": float(out["gate"][torch.as_tensor(unknown, device=dev)].mean())
            if unknown.any()
            else float("nan"),
        },
    )


# -- baselines --------------------------------------------------------------------------------
def _propagation(
    table: AnnData, graph_key: str, values: np.ndarray, known: np.ndarray, n_iterations: int
) -> _Result:
    adjacency = adjacency_tensor(load_graph(table, graph_key))
    res = propagate_labels(
        adjacency,
        torch.from_numpy(values),
        torch.from_numpy(known),
        n_iterations=n_iterations,
        return_spread=True,
    )
    pred = res.values.numpy().copy()
    spread = res.spread.numpy().copy()
    unreached = ~res.reached.numpy()
    if unreached.any():
        logger.warning(
            "Propagation reached no known spot from %d spots in %d steps; they get the mean "
            "profile of the known spots (raise n_iterations= or check the 3D graph).",
            int(unreached.sum()),
            n_iterations,
        )
        pred[unreached] = values[known].mean(0)
        spread[unreached] = np.nan
    return _Result(
        pred,
        spread,
        [],
        {
            "graph_key": graph_key,
            "n_iterations": n_iterations,
            "fraction_unknown_reached": float(1 - unreached[~known].mean())
            if (~known).any()
            else 1.0,
        },
    )


def _known_and_unknown(
    table: AnnData, stack: SectionStack, known: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Known and unknown rows of each sample that has unknown spots."""
    for rows in _groups(table, stack):
        k_rows, u_rows = rows[known[rows]], rows[~known[rows]]
        if len(u_rows) == 0:
            continue
        if len(k_rows) == 0:
            raise InvalidStackError("A sample has no known section; every sample needs one.")
        yield k_rows, u_rows


def _groups(table: AnnData, stack: SectionStack) -> list[np.ndarray]:
    """Row sets that may inform each other: one per sample (all rows if no sample_key)."""
    by_sample = stack.samples()
    if len(by_sample) <= 1:
        return [np.arange(table.n_obs)]
    return [np.concatenate([s.rows for s in sections]) for sections in by_sample.values()]


def _overlap(
    table: AnnData, stack: SectionStack, spatial_key: str, values: np.ndarray, known: np.ndarray
) -> _Result:
    if spatial_key not in table.obsm:
        raise InvalidStackError(
            f"obsm[{spatial_key!r}] is missing: the overlap baseline needs spot centres in a "
            "common (aligned) frame. Run asign_sc.tl.register_sections(...) first, or pass "
            "spatial_key= naming pre-aligned coordinates."
        )
    coords = np.asarray(table.obsm[spatial_key], dtype=float)[:, :2]
    pred = values.copy()
    unc = np.zeros_like(values)
    far = 0
    radius = np.median([s.spot_radius for s in stack])
    for k_rows, u_rows in _known_and_unknown(table, stack, known):
        k = min(2, len(k_rows))
        dist, idx = cKDTree(coords[k_rows]).query(coords[u_rows], k=k)
        dist, idx = dist.reshape(len(u_rows), k), idx.reshape(len(u_rows), k)
        pred[u_rows] = values[k_rows[idx[:, 0]]]
        if k == 2:
            unc[u_rows] = np.abs(values[k_rows[idx[:, 0]]] - values[k_rows[idx[:, 1]]])
        far += int((dist[:, 0] >= 2 * radius).sum())
    if far:
        logger.info("%d spots overlap no known spot; they take the nearest one anyway.", far)
    return _Result(pred, unc, [], {"spatial_key": spatial_key, "n_without_overlap": far})


def _similarity(
    table: AnnData,
    stack: SectionStack,
    features_key: str,
    standardize: Standardize,
    values: np.ndarray,
    known: np.ndarray,
    n_neighbors: int,
) -> _Result:
    key = Key.obsm.features(features_key, "spot")
    if key not in table.obsm:
        raise InvalidStackError(
            f"obsm[{key!r}] is missing: the similarity baseline needs spot image features. "
            "Run asign_sc.tl.extract_features(...) first or pass features_key=."
        )
    feats = np.asarray(table.obsm[key], dtype=np.float32)
    if standardize == "section":
        feats = standardize_by_section(feats, stack)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    feats = feats / np.where(norms > 0, norms, 1.0)  # cosine similarity = Euclidean on the sphere
    pred = values.copy()
    unc = np.zeros_like(values)
    for k_rows, u_rows in _known_and_unknown(table, stack, known):
        k = min(n_neighbors, len(k_rows))
        _, idx = cKDTree(feats[k_rows]).query(feats[u_rows], k=k)
        neighbours = values[k_rows[idx.reshape(len(u_rows), k)]]
        pred[u_rows] = neighbours.mean(1)
        unc[u_rows] = neighbours.std(1)
    return _Result(
        pred,
        unc,
        [],
        {
            "features_key": features_key,
            "standardize_features": standardize,
            "n_neighbors": n_neighbors,
        },
    )


# -- writing --------------------------------------------------------------------------------
def _write(
    table: AnnData,
    result: _Result,
    method: str,
    known_sections: list[str],
    layer_added: str,
    key_added: str,
    layer: str | None,
) -> None:
    cols = gene_positions(table, result.genes)
    n, g = result.values.shape
    matrix = sp.csr_matrix(
        (
            result.values.ravel(),
            (np.repeat(np.arange(n), g), np.tile(cols, n)),
        ),
        shape=(table.n_obs, table.n_vars),
        dtype=np.float32,
    )
    matrix.eliminate_zeros()
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
            "layer": layer,
            "layer_added": layer_added,
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
