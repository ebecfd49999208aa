"""The tensors ASIGN reads from a stack, built once from its table (features, graph, targets)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._utils import by_row_chunks
from asign_sc.models._config import Standardize
from asign_sc.models._propagation import adjacency_tensor
from asign_sc.pp._expression import (
    DEFAULT_WINDOWS,
    counts_matrix,
    gene_positions,
    level_targets,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from asign_sc._stack import SectionStack

__all__ = [
    "GraphInputs",
    "StackData",
    "known_targets",
    "load_graph",
    "resolve_windows",
    "standardize_by_section",
]

logger = logging.getLogger(__name__)


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
        """Embedding sizes per level (``spot_dim``, ``region_dim``, ``global_dim``)."""
        return {
            "spot_dim": int(self.spot.shape[1]),
            "region_dim": int(self.region_tokens.shape[2]),
            "global_dim": int(self.global_tokens.shape[2]),
        }

    @torch.no_grad()
    def reduced(self, net: torch.nn.Module, *, chunk_size: int = 8192) -> GraphInputs:
        """Apply ``net.reduce`` (the model's fixed PCA of every level) to the features.

        Rows are reduced ``chunk_size`` at a time, so the centred copy the projection needs
        never holds more than one chunk of the (wide) features.
        """

        def reduce(level: str, x: torch.Tensor) -> torch.Tensor:
            return by_row_chunks(lambda rows: net.reduce(level, x[rows]), len(x), chunk_size)

        return GraphInputs(
            spot=reduce("spot", self.spot),
            region_tokens=reduce("region", self.region_tokens),
            global_tokens=reduce("global", self.global_tokens),
            edge_index=self.edge_index,
            edge_weight=self.edge_weight,
            adjacency=self.adjacency,
        )

    def features(self) -> dict[str, torch.Tensor]:
        """``{"spot", "region", "global"}`` features (for fitting the reduction)."""
        return {"spot": self.spot, "region": self.region_tokens, "global": self.global_tokens}


@dataclass
class StackData:
    """A stack's network inputs plus where its sections sit in the table.

    Built once by :meth:`from_table`; the model core (training plan, prediction) takes it
    instead of the AnnData.
    """

    inputs: GraphInputs
    obs_names: Sequence[str]
    section_rows: dict[str, np.ndarray]

    @property
    def n_obs(self) -> int:
        """Number of spots."""
        return len(self.obs_names)

    @classmethod
    def from_table(
        cls,
        table: AnnData,
        stack: SectionStack,
        *,
        features_key: str,
        graph_key: str,
        standardize: Standardize,
        max_memory_gb: float | None = None,
    ) -> StackData:
        """Read features (standardised as asked) and the 3D graph of a stack (CPU tensors).

        The features are read as one float32 copy; if that copy would not fit
        ``max_memory_gb`` (default: the memory available now) an
        :class:`~asign_sc.models.InsufficientMemoryError` says so before reading.
        """
        _check_features_memory(table, features_key, max_memory_gb)
        features = _load_features(table, stack, features_key=features_key)
        if standardize == "section":
            features = {
                k: standardize_by_section(v, stack, inplace=True) for k, v in features.items()
            }
        adjacency = adjacency_tensor(load_graph(table, graph_key))
        if adjacency.shape[0] != table.n_obs:
            raise InvalidStackError(
                f"The 3D graph has {adjacency.shape[0]} nodes but the table {table.n_obs} spots."
            )
        # edge_index: source = neighbour j, target = spot i. Edge weights are divided by their
        # maximum for the graph attention (their scale differs between graph builders); the
        # propagation only uses ratios and gets them unscaled.
        rows, cols = adjacency.indices()
        weights = adjacency.values()
        inputs = GraphInputs(
            spot=torch.from_numpy(features["spot"]),
            region_tokens=torch.from_numpy(features["region"]),
            global_tokens=torch.from_numpy(features["global"]),
            edge_index=torch.stack([cols, rows]),
            edge_weight=weights / weights.max().clamp_min(1e-12),
            adjacency=adjacency,
        )
        return cls(
            inputs=inputs,
            obs_names=list(table.obs_names),
            section_rows={s.name: s.rows for s in stack},
        )


def _check_features_memory(table: AnnData, features_key: str, max_memory_gb: float | None) -> None:
    """Fail before reading features whose float32 copy exceeds the memory budget."""
    from asign_sc.models._memory import FLOAT, MemoryEstimate, check_memory, memory_budget

    keys = [
        Key.obsm.features(features_key, "spot"),
        Key.obsm.tokens(features_key, "region"),
        Key.obsm.tokens(features_key, "global"),
    ]
    sizes = [int(np.prod(np.shape(table.obsm[k]))) for k in keys if k in table.obsm]
    estimate = MemoryEstimate({"features": float(sum(sizes)) * FLOAT})
    check_memory(
        estimate,
        memory_budget(max_memory_gb),
        what=f"Reading the image features of {table.n_obs} spots",
    )


def _obsm_array(table: AnnData, key: str, ndim: int, what: str) -> np.ndarray:
    if key not in table.obsm:
        raise InvalidStackError(
            f"obsm[{key!r}] ({what}) is missing. Run asign_sc.tl.extract_features(...) first, "
            "or pass features_key= naming the key_added you extracted features with."
        )
    # one float32 copy (tokens may be stored as float16); standardisation then works in place
    array = np.array(table.obsm[key], dtype=np.float32, copy=True)
    if array.ndim != ndim or array.shape[0] != table.n_obs:
        shape = "(n_obs, dim)" if ndim == 2 else "(n_obs, n_tokens, dim)"
        raise InvalidStackError(f"obsm[{key!r}] must have shape {shape}, got {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise InvalidStackError(f"obsm[{key!r}] has NaN or infinite values; re-extract features.")
    return array


def _load_features(
    table: AnnData, stack: SectionStack, *, features_key: str
) -> dict[str, np.ndarray]:
    """Spot embeddings and region/global token grids of ``features_key``."""
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
    return arrays


def standardize_by_section(
    array: np.ndarray, stack: SectionStack, *, inplace: bool = False
) -> np.ndarray:
    """Z-score every feature within each section (over its spots, and tokens if any).

    This removes the section-to-section shift of image embeddings (stain, scanner,
    background) that otherwise makes a model trained on one section extrapolate badly.
    With ``inplace=True`` ``array`` itself is overwritten (no second copy of the features).
    """
    out = array if inplace else np.empty_like(array)
    for section in stack:
        block = array[section.rows]
        axes = tuple(range(block.ndim - 1))
        mean = block.mean(axis=axes, keepdims=True)
        std = block.std(axis=axes, keepdims=True)
        out[section.rows] = (block - mean) / np.where(std > 1e-6, std, 1.0)
    return out


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


def known_targets(
    table: AnnData,
    stack: SectionStack,
    *,
    rows: np.ndarray,
    genes: Sequence[str],
    counts_layer: str | None,
    target_sum: float,
    windows: Mapping[str, float | Mapping[str, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Normalised targets of the measured spots ``rows`` (spot level, and windows if given).

    Window targets sum counts over ``rows`` only, so spots outside ``rows`` (e.g. held out
    for validation) never enter them.
    """
    counts = counts_matrix(table, counts_layer, rows)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    if (totals == 0).any():
        logger.warning(
            "%d known spots have no counts at all; their normalised expression is 0.",
            int((totals == 0).sum()),
        )
    return level_targets(
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
                "targets (TrainingConfig(%s_size=...)).",
                level,
                Key.uns.params(features_key),
                DEFAULT_WINDOWS[level],
                level,
                level,
            )
    return windows
