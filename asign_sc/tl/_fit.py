"""``fit_asign``: train MSAGNet + cross-layer imputation on a stack with known sections."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack
from asign_sc._utils import sanitize_uns
from asign_sc.models._asign import ASIGNEnsemble, ASIGNModel, ASIGNNet, resolve_device
from asign_sc.models._losses import ASIGNLoss, LossWeights, pcc_loss
from asign_sc.models._propagation import adjacency_tensor
from asign_sc.pp._expression import (
    DEFAULT_TARGET_SUM,
    DEFAULT_WINDOWS,
    _level_targets,
    counts_matrix,
    gene_positions,
    known_rows,
    select_genes,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["fit_asign"]

logger = logging.getLogger(__name__)

Standardize = Literal["section"] | None
LEVELS = ("spot", "region", "global")
VAL_SMOOTHING = 0.8
"""Weight of the past in the exponential moving average of the validation loss."""


# -- inputs shared by fit and impute ------------------------------------------------------
@dataclass
class GraphInputs:
    """Everything the network reads from a stack, as tensors on one device."""

    spot: torch.Tensor
    region_tokens: torch.Tensor
    global_tokens: torch.Tensor
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    adjacency: torch.Tensor

    def to(self, device: torch.device) -> GraphInputs:
        """Move every tensor to ``device``."""
        return GraphInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def args(self) -> tuple[torch.Tensor, ...]:
        """Positional arguments of :class:`~asign_sc.models.ASIGNNet` before the labels."""
        return (
            self.spot,
            self.region_tokens,
            self.global_tokens,
            self.edge_index,
            self.edge_weight,
            self.adjacency,
        )

    @property
    def dims(self) -> dict[str, int]:
        """Embedding sizes per level."""
        return {
            "spot_dim": int(self.spot.shape[1]),
            "region_dim": int(self.region_tokens.shape[2]),
            "global_dim": int(self.global_tokens.shape[2]),
        }


def _obsm_array(table: AnnData, key: str, ndim: int, what: str) -> np.ndarray:
    if key not in table.obsm:
        raise InvalidStackError(
            f"obsm[{key!r}] ({what}) is missing. Run asign_sc.tl.extract_features(...) first, "
            "or pass features_key= naming the key_added you extracted features with."
        )
    array = np.asarray(table.obsm[key], dtype=np.float32)
    if array.ndim != ndim or array.shape[0] != table.n_obs:
        shape = "(n_obs, dim)" if ndim == 2 else "(n_obs, n_tokens, dim)"
        raise InvalidStackError(f"obsm[{key!r}] must have shape {shape}, got {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InvalidStackError(f"obsm[{key!r}] has NaN or infinite values; re-extract features.")
    return array


def standardize_by_section(array: np.ndarray, stack: SectionStack) -> np.ndarray:
    """Z-score every feature within each section (over its spots, and tokens if any).

    This removes the section-to-section shift of image embeddings (stain, scanner,
    background) that otherwise makes a model trained on one section extrapolate badly.
    """
    out = np.empty_like(array)
    for section in stack:
        block = array[section.rows]
        axes = tuple(range(block.ndim - 1))
        mean = block.mean(axis=axes, keepdims=True)
        std = block.std(axis=axes, keepdims=True)
        out[section.rows] = (block - mean) / np.where(std > 1e-6, std, 1.0)
    return out


def load_features(
    table: AnnData, stack: SectionStack, *, features_key: str, standardize: Standardize
) -> dict[str, np.ndarray]:
    """Spot embeddings and region/global token grids, standardised as asked."""
    if standardize not in ("section", None):
        raise ValueError(f"standardize_features must be 'section' or None, got {standardize!r}.")
    arrays = {
        "spot": _obsm_array(table, Key.obsm.features(features_key, "spot"), 2, "spot features"),
        "region": _obsm_array(table, Key.obsm.tokens(features_key, "region"), 3, "region tokens"),
        "global": _obsm_array(table, Key.obsm.tokens(features_key, "global"), 3, "global tokens"),
    }
    for level in ("region", "global"):
        if arrays[level].shape[1] < 2:
            raise InvalidStackError(
                f"obsm[{Key.obsm.tokens(features_key, level)!r}] has one token per spot; ASIGN's "
                "cross-attention needs a grid of several tokens per window. Extract features "
                "with a token grid (asign_sc.tl.extract_features keeps one by default)."
            )
    if standardize == "section":
        arrays = {k: standardize_by_section(v, stack) for k, v in arrays.items()}
    return arrays


def load_graph(table: AnnData, graph_key: str) -> sp.csr_matrix:
    """The 3D graph ``obsp[f"{graph_key}_connectivities"]`` as CSR."""
    key = Key.obsp.connectivities(graph_key)
    if key not in table.obsp:
        raise InvalidStackError(
            f"obsp[{key!r}] is missing. Build the 3D spot graph with "
            "asign_sc.gr.build_3d_graph(...) first, or pass graph_key= naming its key_added."
        )
    graph = sp.csr_matrix(table.obsp[key], dtype=np.float32)
    if graph.nnz == 0:
        raise InvalidStackError(f"obsp[{key!r}] has no edges; rebuild the 3D graph.")
    return graph


def graph_tensors(graph: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``edge_index`` (source = neighbour j, target = spot i), scaled edge weights, adjacency.

    Edge weights are divided by their maximum for the graph attention (their scale differs
    between graph builders; the propagation only uses ratios and gets them unscaled).
    """
    adjacency = adjacency_tensor(graph)
    rows, cols = adjacency.indices()
    weights = adjacency.values()
    scale = weights.max().clamp_min(1e-12)
    edge_index = torch.stack([cols, rows])
    return edge_index, weights / scale, adjacency


def build_inputs(
    table: AnnData,
    stack: SectionStack,
    *,
    features_key: str,
    graph_key: str,
    standardize: Standardize,
) -> GraphInputs:
    """Read features and graph of a stack into :class:`GraphInputs` (CPU)."""
    features = load_features(table, stack, features_key=features_key, standardize=standardize)
    edge_index, edge_weight, adjacency = graph_tensors(load_graph(table, graph_key))
    if adjacency.shape[0] != table.n_obs:
        raise InvalidStackError(
            f"The 3D graph has {adjacency.shape[0]} nodes but the table {table.n_obs} spots."
        )
    return GraphInputs(
        spot=torch.from_numpy(features["spot"]),
        region_tokens=torch.from_numpy(features["region"]),
        global_tokens=torch.from_numpy(features["global"]),
        edge_index=edge_index,
        edge_weight=edge_weight,
        adjacency=adjacency,
    )


@torch.no_grad()
def reduce_inputs(net: ASIGNEnsemble | ASIGNNet, inputs: GraphInputs) -> GraphInputs:
    """Apply the model's fixed feature reduction (PCA) to every level."""
    return GraphInputs(
        spot=net.reduce("spot", inputs.spot),
        region_tokens=net.reduce("region", inputs.region_tokens),
        global_tokens=net.reduce("global", inputs.global_tokens),
        edge_index=inputs.edge_index,
        edge_weight=inputs.edge_weight,
        adjacency=inputs.adjacency,
    )


def known_values(
    table: AnnData,
    stack: SectionStack,
    *,
    rows: np.ndarray,
    genes: Sequence[str],
    layer: str | None,
    target_sum: float,
    windows: dict[str, float | dict[str, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Normalised targets of the measured spots ``rows`` (spot level, and windows if given).

    Window targets sum counts over ``rows`` only, so spots outside ``rows`` (e.g. held out
    for validation) never enter them.
    """
    counts = counts_matrix(table, layer, rows)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    if (totals == 0).any():
        logger.warning(
            "%d known spots have no counts at all; their normalised expression is 0.",
            int((totals == 0).sum()),
        )
    return _level_targets(
        stack,
        rows,
        counts,
        totals,
        gene_positions(table, genes),
        windows=windows or {},
        target_sum=target_sum,
    )


def resolve_windows(
    table: AnnData,
    stack: SectionStack,
    features_key: str,
    region_size: float | None,
    global_size: float | None,
) -> dict[str, float | dict[str, float]]:
    """Window sides (px) of the region/global targets: given, else those of the features.

    :func:`asign_sc.tl.extract_features` records each section's window sides in
    ``uns[features_key]["features"]["windows_px"]`` (``{section: [spot, region, global]}``);
    the targets of eq. 10 use the same windows as the images.
    """
    params = table.uns.get(Key.uns.params(features_key), {})
    recorded = params.get("features", {}).get("windows_px") if hasattr(params, "get") else None
    windows: dict[str, float | dict[str, float]] = {}
    for i, (level, given) in enumerate((("region", region_size), ("global", global_size)), 1):
        if given is not None:
            windows[level] = float(given)
        elif recorded is not None and all(s in recorded for s in stack.names):
            windows[level] = {s: float(np.asarray(recorded[s])[i]) for s in stack.names}
        else:
            windows[level] = DEFAULT_WINDOWS[level]
            logger.info(
                "No %s window sizes recorded in uns[%r]['features']; using %g px for the %s "
                "targets (pass %s_size=).",
                level,
                Key.uns.params(features_key),
                DEFAULT_WINDOWS[level],
                level,
                level,
            )
    return windows


# -- fitting --------------------------------------------------------------------------------
def fit_asign(
    data: AnnData | SpatialData,
    *,
    known_sections: Sequence[str],
    genes: Sequence[str] | None = None,
    n_top_genes: int = 250,
    layer: str | None = None,
    library_key: str = Key.obs.library,
    sample_key: str | None = None,
    features_key: str = "asign",
    graph_key: str = "spatial3d",
    standardize_features: Standardize = "section",
    target_sum: float = DEFAULT_TARGET_SUM,
    region_size: float | None = None,
    global_size: float | None = None,
    n_components: int | None = 64,
    hidden_dim: int = 128,
    n_gat_layers: int = 3,
    n_heads: int = 4,
    dropout: float = 0.1,
    cross_attention: bool = True,
    graph_attention: bool = True,
    n_iterations: int = 10,
    learn_node_weights: bool = True,
    n_models: int = 3,
    epochs: int = 300,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    mask_fraction: float = 0.8,
    validation_fraction: float = 0.2,
    early_stopping: bool = True,
    patience: int = 30,
    loss_weights: LossWeights | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    show_progress_bar: bool = True,
    key_added: str = "asign",
) -> ASIGNModel:
    """Train ASIGN (MSAGNet + cross-layer imputation) on a stack with known sections.

    Expression of the known sections is normalised as ``log1p`` of library-size-normalised
    counts (counts per ``target_sum``, library size over all genes), the same at prediction;
    region and global targets sum the counts of the spots in the region/global window (eq.
    10). Training is full-graph: every epoch runs the network on all spots of the stack
    (images only) and propagates labels over the 3D graph. Each epoch hides a random
    ``mask_fraction`` of the training spots from the propagation input and supervises the
    blended prediction on exactly those spots, so a spot's own label never enters its
    prediction; the network heads are supervised on all training spots (eq. 7-9). A
    ``validation_fraction`` of the known spots is never used for training: early stopping
    watches the loss of the blended prediction on them.

    Parameters
    ----------
    data
        AnnData or SpatialData with image features (:func:`asign_sc.tl.extract_features`)
        and a 3D graph (:func:`asign_sc.gr.build_3d_graph`).
    known_sections
        Sections with measured expression (raw counts in ``X`` or ``layer``).
    genes
        Genes to model; default the ``n_top_genes`` of highest mean count over the known
        spots (:func:`asign_sc.pp.select_genes`).
    n_top_genes
        Number of genes when ``genes`` is not given (paper: 250).
    layer
        Layer with raw counts; ``None`` for ``X``.
    library_key
        Column of ``obs`` naming each spot's section.
    sample_key
        Column of ``obs`` naming the sample when the object holds several stacks.
    features_key
        ``key_added`` of the features: ``obsm[f"X_{features_key}_spot"]`` and the token grids
        ``obsm[f"X_{features_key}_region_tokens"]``, ``obsm[f"X_{features_key}_global_tokens"]``.
    graph_key
        ``key_added`` of the 3D graph: ``obsp[f"{graph_key}_connectivities"]``.
    standardize_features
        ``"section"`` (default): z-score every feature within each section, which removes
        the section-to-section shift of image embeddings (stain, scanner); ``None``: use
        features as they are. Stored in the model and applied identically by
        :func:`asign_sc.tl.impute`.
    target_sum
        Counts per spot after library-size normalisation.
    region_size, global_size
        Window sides (full-resolution px) for the region/global targets; default the window
        sizes recorded by the feature extraction, else 512 and 1024 px.
    n_components
        Reduce each level's (standardised) features to this many principal components,
        fitted on this stack and stored in the model; ``None`` feeds the full embeddings
        (slower, and more prone to over-fit a single known section).
    hidden_dim, n_gat_layers, n_heads, dropout
        Architecture of :class:`~asign_sc.models.MSAGNet`.
    cross_attention
        Fuse the spot, region and global features by cross-attention (default, eq. 2-3).
        ``False`` is the paper's "w.o Cross-atten" ablation: ``f'_s`` and ``f''_s`` become
        a linear map of the mean region and global token (attention with uniform weights),
        so the region/global context still enters but not weighted by relevance to the spot.
    graph_attention
        Spread features over the 3D graph by ``n_gat_layers`` GATv2 rounds (default, eq.
        4). ``False`` is the paper's "w.o GAT" ablation: the rounds become spot-wise linear
        layers of the same depth and width (:class:`~asign_sc.models.SpotwiseLayers`), so
        the network predicts each spot from its own images; the cross-layer imputation
        still propagates over the graph. Both switches are stored in the model, and
        :func:`asign_sc.tl.impute` and :meth:`~asign_sc.models.ASIGNModel.load` rebuild
        the same architecture.
    n_iterations
        Propagation steps ``T`` of cross-layer imputation (paper: 10).
    learn_node_weights
        Learn the propagation's node weights ``α_j`` from node embeddings.
    n_models
        Train this many networks (seeds ``seed``, ``seed + 1``, ..., each with its own
        held-out spots) and average them (:class:`~asign_sc.models.ASIGNEnsemble`); their
        spread becomes the uncertainty of :func:`asign_sc.tl.impute`. One known section
        gives few training spots, so the average is noticeably better than one network
        (about +0.02 per-gene PCC on her2st), at ``n_models`` times the training time.
    epochs
        Maximum number of full-graph epochs (one optimiser step each).
    lr
        Learning rate; default ``1e-3`` for AdamW, ``1e-2`` for SGD. Decays by a cosine
        schedule to 1% of it (paper).
    weight_decay
        Weight decay (paper: ``1e-4``).
    optimizer
        ``"adamw"`` (default; converges in a few hundred full-graph steps) or ``"sgd"``
        with momentum 0.9, as in the paper.
    mask_fraction
        Share of the training spots hidden from the propagation input and supervised in each
        epoch (paper: 20% of labels known, so 0.8).
    validation_fraction
        Share of the known spots held out for early stopping (0 disables validation).
    early_stopping
        Stop when the validation loss (its exponential moving average, as a few dozen
        held-out spots give a noisy loss) has not improved for ``patience`` epochs, and keep
        the best weights.
    patience
        Epochs without improvement before stopping.
    loss_weights
        λ and γ of eq. 7-9 and the PCC axis; default the paper's.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ...
    seed
        Seed of the initialisation and of every random split; CPU training is deterministic.
    show_progress_bar
        Show a progress bar with the losses.
    key_added
        Training parameters and history go to ``uns[key_added]["fit"]`` (other entries of
        ``uns[key_added]``, such as the features' parameters, are kept).

    Returns
    -------
    The fitted model; ``model.history`` holds the per-epoch losses (column ``member`` says
    which network of the ensemble).
    """
    t0 = time.perf_counter()
    stack = resolve_stack(data, library_key=library_key, sample_key=sample_key)
    table = stack.table
    if isinstance(known_sections, str):
        known_sections = [known_sections]
    known_sections = [str(s) for s in known_sections]
    _check_fraction("mask_fraction", mask_fraction, closed_low=False)
    _check_fraction("validation_fraction", validation_fraction, closed_low=True)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if n_models < 1:
        raise ValueError(f"n_models must be at least 1, got {n_models}.")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
    for name, value in (("cross_attention", cross_attention), ("graph_attention", graph_attention)):
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    if n_gat_layers < 1:
        what = "graph-attention rounds" if graph_attention else "spot-wise layers"
        raise ValueError(
            f"n_gat_layers must be at least 1 (the number of {what}), got {n_gat_layers}. "
            "To train without graph attention pass graph_attention=False."
        )
    if len(known_sections) == len(stack) and len(stack) > 1:
        logger.warning("Every section is known; there is nothing to impute across sections.")
    if genes is None:
        genes = select_genes(
            data,
            known_sections=known_sections,
            n_top_genes=min(n_top_genes, table.n_vars),
            layer=layer,
            library_key=library_key,
        )
    genes = [str(g) for g in genes]
    windows = resolve_windows(table, stack, features_key, region_size, global_size)
    rows = known_rows(stack, known_sections)
    spot_targets = known_values(
        table, stack, rows=rows, genes=genes, layer=layer, target_sum=target_sum
    )["spot"]
    inputs = build_inputs(
        table,
        stack,
        features_key=features_key,
        graph_key=graph_key,
        standardize=standardize_features,
    )
    dev = resolve_device(device)
    torch.manual_seed(seed)
    settings = {
        "architecture": {
            **inputs.dims,
            "n_genes": len(genes),
            "hidden_dim": hidden_dim,
            "n_gat_layers": n_gat_layers,
            "n_heads": n_heads,
            "dropout": dropout,
            "cross_attention": bool(cross_attention),
            "graph_attention": bool(graph_attention),
            "n_iterations": n_iterations,
            "learn_node_weights": learn_node_weights,
            "n_components": n_components,
            "n_models": n_models,
        },
        "genes": genes,
        "normalization": {"method": "log1p_library_size", "target_sum": target_sum, "layer": layer},
        "features": {"key": features_key, "standardize": standardize_features},
        "graph": {"key": graph_key},
        "targets": {"windows_px": windows},
        "library_key": library_key,
        "sample_key": sample_key,
        "known_sections": known_sections,
        "loss": (loss_weights or LossWeights()).to_dict(),
        "training": {
            "epochs": epochs,
            "lr": lr if lr is not None else (1e-3 if optimizer == "adamw" else 1e-2),
            "weight_decay": weight_decay,
            "optimizer": optimizer,
            "mask_fraction": mask_fraction,
            "validation_fraction": validation_fraction,
            "early_stopping": early_stopping,
            "patience": patience,
            "seed": seed,
        },
    }
    model = ASIGNModel.from_settings(settings)
    model.net.fit_reduction(
        {"spot": inputs.spot, "region": inputs.region_tokens, "global": inputs.global_tokens},
        seed=seed,
    )
    reduced = reduce_inputs(model.net, inputs)
    history: dict[str, list] = {}
    best_epochs, validation_obs = [], []
    for k, member in enumerate(model.net.members):
        # each member: its own seed, held-out spots and masks
        member_seed = seed + k
        rng = np.random.default_rng(member_seed)
        torch.manual_seed(member_seed)
        val_pos, pool_pos = _split(rows, validation_fraction, early_stopping, rng)
        pool_targets = known_values(
            table,
            stack,
            rows=rows[pool_pos],
            genes=genes,
            layer=layer,
            target_sum=target_sum,
            windows=windows,
        )
        trainer = _Trainer(
            member,
            settings["training"],
            reduced,
            rows,
            spot_targets,
            pool_targets,
            pool_pos=pool_pos,
            val_pos=val_pos,
            n_obs=table.n_obs,
            rng=rng,
            device=dev,
            loss_weights=loss_weights or LossWeights(),
        )
        member_history = trainer.run(
            show_progress_bar=show_progress_bar,
            desc=f"ASIGN {k + 1}/{n_models}" if n_models > 1 else "ASIGN",
        )
        member_history["member"] = [k] * len(member_history["epoch"])
        for key, values in member_history.items():
            history.setdefault(key, []).extend(values)
        best_epochs.append(trainer.best_epoch)
        validation_obs.append(table.obs_names[rows[val_pos]].tolist())
    model.net.eval()
    model.history = history
    model.settings["training"]["best_epoch"] = best_epochs
    model.settings["training"]["validation_obs"] = validation_obs
    model.settings["training"]["seconds"] = round(time.perf_counter() - t0, 2)
    update_params(
        table,
        key_added,
        "fit",
        {
            "known_sections": known_sections,
            "genes": genes,
            "n_known_spots": len(rows),
            "device": str(dev),
            **{k: v for k, v in model.settings.items() if k not in ("genes", "known_sections")},
            "training": {
                k: v for k, v in model.settings["training"].items() if k != "validation_obs"
            },
            "history": model.history,
        },
    )
    logger.info(
        "Fitted ASIGN (%d model(s)) on %d known spots of %s (%d genes, %d epochs, best %s, "
        "%.1fs on %s); parameters and history in uns[%r]['fit'].",
        n_models,
        len(rows),
        known_sections,
        len(genes),
        len(model.history.get("epoch", [])),
        best_epochs,
        time.perf_counter() - t0,
        dev,
        Key.uns.params(key_added),
    )
    return model


def update_params(table: AnnData, key_added: str, entry: str, record: dict) -> None:
    """Write ``record`` to ``uns[key_added][entry]``, keeping the other entries."""
    key = Key.uns.params(key_added)
    params = table.uns.get(key)
    params = dict(params) if isinstance(params, dict) else {}
    params[entry] = sanitize_uns(record)
    table.uns[key] = params


def _split(
    rows: np.ndarray, fraction: float, early_stopping: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``rows``) of the validation spots and of the training pool."""
    order = rng.permutation(len(rows))
    n_val = round(fraction * len(rows))
    if early_stopping and n_val == 0:
        raise ValueError(
            "early_stopping=True needs held-out spots: set validation_fraction > 0 (and enough "
            "known spots), or early_stopping=False."
        )
    if len(rows) - n_val < 4:
        raise InvalidStackError(
            f"Only {len(rows)} known spots ({n_val} held out for validation): at least 4 are "
            "needed to train. Use more known spots or a smaller validation_fraction."
        )
    return np.sort(order[:n_val]), np.sort(order[n_val:])


def _check_fraction(name: str, value: float, *, closed_low: bool) -> None:
    low_ok = value >= 0 if closed_low else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")


class _Trainer:
    """Full-graph training loop with masked propagation and early stopping."""

    def __init__(
        self,
        net: ASIGNNet,
        training: dict,
        inputs: GraphInputs,
        rows: np.ndarray,
        spot_targets: np.ndarray,
        pool_targets: dict[str, np.ndarray],
        *,
        pool_pos: np.ndarray,
        val_pos: np.ndarray,
        n_obs: int,
        rng: np.random.Generator,
        device: torch.device,
        loss_weights: LossWeights,
    ) -> None:
        self.rng, self.device = rng, device
        self.net = net.to(device)
        self.inputs = inputs.to(device)
        self.n_obs = n_obs
        self.loss = ASIGNLoss(loss_weights)
        self.lambda_s = loss_weights.lambda_s
        self.pcc_axis = loss_weights.pcc_axis
        self.epochs = int(training["epochs"])
        self.patience = int(training["patience"])
        self.early_stopping = bool(training["early_stopping"])
        self.mask_fraction = float(training["mask_fraction"])
        # positions into `rows`: validation (never trained on) and training pool
        self.val_pos, self.pool_pos = val_pos, pool_pos
        self.rows = torch.as_tensor(rows, device=device)
        self.pool_rows = self.rows[torch.as_tensor(pool_pos, device=device)]
        # targets of the pool, in pool order (spot level = measured values)
        self.targets = {k: torch.as_tensor(v, device=device) for k, v in pool_targets.items()}
        values = torch.zeros(n_obs, spot_targets.shape[1], device=device)
        values[self.rows] = torch.as_tensor(spot_targets, device=device)
        self.values = values
        # validation input: a fixed share of the pool visible, as dense as in training
        n_visible = max(1, round((1 - self.mask_fraction) * len(self.pool_pos)))
        self.val_visible = self._mask(rng.choice(self.pool_pos, n_visible, replace=False))

        self.net.network.set_output_bias({level: self.targets[level].mean(0) for level in LEVELS})
        lr = float(training["lr"])
        params = self.net.parameters()
        if training["optimizer"] == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=lr, weight_decay=training["weight_decay"]
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=lr, momentum=0.9, weight_decay=training["weight_decay"]
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda epoch: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs)),
        )
        self.best_epoch = 0

    def _mask(self, positions: np.ndarray) -> torch.Tensor:
        mask = torch.zeros(self.n_obs, dtype=torch.bool, device=self.device)
        mask[self.rows[torch.as_tensor(positions, device=self.device)]] = True
        return mask

    def _spot_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred, target) + self.lambda_s * pcc_loss(
            pred, target, axis=self.pcc_axis
        )

    def step(self) -> dict[str, float]:
        """One epoch: hide a random part of the pool, supervise it and the network heads."""
        self.net.train()
        n_hidden = max(1, round(self.mask_fraction * len(self.pool_pos)))
        hidden_pos = self.rng.choice(self.pool_pos, n_hidden, replace=False)
        visible_pos = np.setdiff1d(self.pool_pos, hidden_pos)
        visible = self._mask(visible_pos)
        out = self.net(*self.inputs.args(), self.values, visible)
        net_loss, parts = self.loss(
            {level: out[level][self.pool_rows] for level in LEVELS},
            self.targets,
            consistency_pred={level: out[level] for level in LEVELS},
        )
        hidden_rows = self.rows[torch.as_tensor(hidden_pos, device=self.device)]
        blend_loss = self._spot_loss(out["prediction"][hidden_rows], self.values[hidden_rows])
        loss = net_loss + blend_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.optimizer.step()
        self.scheduler.step()
        return {
            "loss": float(loss.detach()),
            "network_loss": float(net_loss.detach()),
            "blend_loss": float(blend_loss.detach()),
            "mse": float(parts["mse"]),
            "pcc_spot": float(parts["pcc_spot"]),
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the blended and network predictions on the validation spots."""
        self.net.eval()
        out = self.net(*self.inputs.args(), self.values, self.val_visible)
        rows = self.rows[torch.as_tensor(self.val_pos, device=self.device)]
        target = self.values[rows]
        return {
            "val_loss": float(self._spot_loss(out["prediction"][rows], target)),
            "val_pcc": 1.0 - float(pcc_loss(out["prediction"][rows], target)),
            "val_network_pcc": 1.0 - float(pcc_loss(out["spot"][rows], target)),
        }

    def run(self, *, show_progress_bar: bool, desc: str = "ASIGN") -> dict[str, list]:
        """Train until ``epochs`` or early stopping; returns the history."""
        history: dict[str, list] = {}
        best, best_state, stale = math.inf, None, 0
        bar = tqdm(range(self.epochs), desc=desc, disable=not show_progress_bar, leave=False)
        for epoch in bar:
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], **self.step()}
            if len(self.val_pos):
                record.update(self.validate())
                # a few dozen held-out spots give a noisy loss: stop on its moving average
                smoothed = history.get("val_loss_smoothed", [record["val_loss"]])[-1]
                record["val_loss_smoothed"] = (
                    VAL_SMOOTHING * smoothed + (1 - VAL_SMOOTHING) * record["val_loss"]
                )
            for k, v in record.items():
                history.setdefault(k, []).append(v)
            if not all(math.isfinite(v) for v in record.values()):
                raise FloatingPointError(
                    f"Training diverged at epoch {epoch} ({record}). Lower lr= or use "
                    "optimizer='adamw'."
                )
            bar.set_postfix(
                {k: f"{record[k]:.3f}" for k in ("loss", "val_loss", "val_pcc") if k in record}
            )
            if len(self.val_pos):
                if record["val_loss_smoothed"] < best - 1e-4:
                    best, stale, self.best_epoch = record["val_loss_smoothed"], 0, epoch
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    stale += 1
                if self.early_stopping and stale >= self.patience:
                    logger.info("Early stopping at epoch %d (best %d).", epoch, self.best_epoch)
                    break
            else:
                self.best_epoch = epoch
        bar.close()
        if self.early_stopping and best_state is not None:
            self.net.load_state_dict(best_state)
        return history
