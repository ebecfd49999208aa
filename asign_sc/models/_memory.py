"""Memory estimates of training and prediction, checked before any work is done.

A stack too large for the chosen settings should fail at once with a message naming the
setting to change, not be killed for lack of memory minutes later. The estimates count the
float32 tensors of one forward (and backward) pass from the shapes involved: spots x tokens x
feature sizes for the fusion, edges x heads for the graph attention, spots x genes x
iterations for the propagation. They are upper-end approximations (about 1.3 times the
measured peak on CPU, see ``TRAINING_FACTOR``), not measurements.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "InsufficientMemoryError",
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "chunked_pass_bytes",
    "features_bytes",
    "network_bytes",
]

logger = logging.getLogger(__name__)

FLOAT = 4
"""Bytes per float32."""
GB = 1024**3
TRAINING_FACTOR = 1.25
"""Training memory over the forward sum of the stages. Measured: full-graph training of
plain 10-section stacks (62 edges per spot, default architecture, 250 genes) raised the peak
RSS by 2.45 GB at 4,000 spots and 4.76 GB at 8,000, against forward sums of 2.52 and 5.04 GB:
saved activations and their gradients are not all alive at once. 1.25 leaves a margin; the
earlier factor 2 refused a 10 x 1,000-spot synthetic stack that fits in 15 GB."""

HINTS = {
    "features": (
        "the stored image features are too wide: extract them with a smaller token grid "
        "(asign_sc.tl.extract_features(tokens=2)) or reduced "
        "(asign_sc.tl.extract_features(n_components=64))"
    ),
    "inputs": (
        "the stack's reduced features (with the mini-batches' copies) are too large: lower "
        "ArchitectureConfig(n_components=...) or extract fewer tokens "
        "(asign_sc.tl.extract_features(tokens=2))"
    ),
    "fusion": (
        "the token cross-attention of each batch is too large: lower "
        "TrainingConfig(batch_size=...), ArchitectureConfig(n_components=...) or "
        "ArchitectureConfig(hidden_dim=...), or extract fewer tokens "
        "(asign_sc.tl.extract_features(tokens=2))"
    ),
    "graph_attention": (
        "the graph attention of each batch (edges x heads) is too large: in mini-batch "
        "training lower TrainingConfig(num_neighbors=...) (sampled in-edges per spot), or "
        "build the 3D graph with fewer edges per spot (asign_sc.gr.build_3d_graph("
        "max_section_gap=2) on a tall stack, or a smaller n_neighs_across), or lower "
        "TrainingConfig(batch_size=...), TrainingConfig(propagation_hops=...) or "
        "ArchitectureConfig(hidden_dim=...); a mini-batch holds spots up to propagation_hops "
        "+ n_gat_layers hops from its tile, so on a dense graph fewer edges help most"
    ),
    "transformer": (
        "the per-spot transformer of each batch is too large: lower "
        "TrainingConfig(batch_size=...) or ArchitectureConfig(hidden_dim=...)"
    ),
    "propagation": (
        "the cross-layer propagation (spots x genes x iterations) is too large: model fewer "
        "genes (fit_asign(n_top_genes=...)), lower TrainingConfig(batch_size=...), "
        "TrainingConfig(propagation_hops=...) (mini-batch subgraphs) or "
        "ArchitectureConfig(n_iterations=...)"
    ),
    "heads": "the output heads are too large: model fewer genes (fit_asign(n_top_genes=...))",
    "parameters": "the network is too large: lower ArchitectureConfig(hidden_dim=...)",
}


class InsufficientMemoryError(MemoryError):
    """Settings whose estimated memory exceeds the budget (raised before any work)."""


@dataclass
class MemoryEstimate:
    """Estimated bytes per part of a computation."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of the parts (bytes)."""
        return float(sum(self.parts.values()))

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        parts = dict(self.parts)
        for key, value in other.parts.items():
            parts[key] = parts.get(key, 0.0) + value
        return MemoryEstimate(parts)

    def describe(self) -> str:
        """``"fusion 1.2 GB, graph_attention 0.3 GB, ..."``, largest first."""
        items = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {readable(v)}" for k, v in items)


#: Floats per edge and graph-attention round, in units of ``hidden_dim``, by layer.
EDGE_WIDTH = {"gat": 3, "gatv2": 5}


def readable(n_bytes: float) -> str:
    """``"2.50 GB"``, ``"12.3 MB"`` or ``"512 kB"``."""
    if n_bytes >= 0.1 * GB:
        return f"{n_bytes / GB:.2f} GB"
    if n_bytes >= 1024**2:
        return f"{n_bytes / 1024**2:.1f} MB"
    return f"{n_bytes / 1024:.0f} kB"


def features_bytes(
    n_obs: int, dims: Mapping[str, int], n_tokens: Mapping[str, int]
) -> MemoryEstimate:
    """The float32 feature arrays read from the table (one copy, standardised in place).

    Parameters
    ----------
    n_obs
        Spots.
    dims
        ``{"spot_dim", "region_dim", "global_dim"}``.
    n_tokens
        ``{"region", "global"}`` tokens per spot.
    """
    width = dims["spot_dim"] + sum(n_tokens[k] * dims[f"{k}_dim"] for k in ("region", "global"))
    return MemoryEstimate({"features": float(n_obs) * width * FLOAT})


def network_bytes(
    n_nodes: int,
    n_edges: int,
    *,
    dims: Mapping[str, int],
    n_tokens: Mapping[str, int],
    n_genes: int,
    hidden_dim: int,
    n_heads: int,
    n_gat_layers: int,
    n_iterations: int,
    training: bool,
    gat_variant: str = "gat",
    cross_attention: bool = True,
    token_pooling: str = "mean_then_project",
    graph_attention: bool = True,
) -> MemoryEstimate:
    """Activations of one pass of :class:`~asign_sc.models.ASIGNNet` over a (sub)graph.

    ``dims`` are the (reduced) feature sizes the network reads; ``gat_variant`` the
    graph-attention layer (``"gat"`` or ``"gatv2"``); ``cross_attention`` and
    ``graph_attention`` the network's blocks (without them: mean-pooled tokens, projected
    once per level or per token as ``token_pooling`` says, and spot-wise layers, which read
    no edges). With ``training=True`` the saved activations of
    every stage and their gradients count (``TRAINING_FACTOR`` times the forward sum), and
    the propagation keeps every iteration for the backward pass; without, only the largest
    stage plus the tensors kept between stages, and one iteration's temporaries.
    """
    n, e, h, g = float(n_nodes), float(n_edges + n_nodes), float(hidden_dim), float(n_genes)
    tokens = n_tokens["region"] + n_tokens["global"]
    inputs = dims["spot_dim"] + sum(n_tokens[k] * dims[f"{k}_dim"] for k in ("region", "global"))
    # q/k/v/attention per token, or with mean-pooled tokens three projected levels (and
    # the projected tokens when they are averaged after the projection)
    if cross_attention:
        fusion = h * (3 + 7 * tokens) + n_heads * tokens * 3
    elif token_pooling == "mean_then_project":
        fusion = h * 3 * 3
    else:
        fusion = h * 3 * (3 + tokens)
    # per edge (self-loops included), GAT: x_j, the edge embedding, the message, and
    # logits, softmax, dropout per head; GATv2 adds x_i and the activated sum. Per node the
    # linear maps and the layer output. Training at h = 128, 4 heads measured 3.3 h (GAT)
    # and 4.3 h (GATv2) floats per edge and round; times TRAINING_FACTOR these widths stay
    # above that. Spot-wise layers: the per-node part only.
    per_edge = e * (EDGE_WIDTH[gat_variant] * h + 8 * n_heads) if graph_attention else 0.0
    # with autograd, per iteration: weighted labels, numerator, denominator, new values,
    # clamping, all kept for the backward pass; without, a step updates one buffer and its
    # product in place (3 label-sized arrays at its peak, with the input labels and the
    # result 5; RSS rose by 3-5 on 50,000 spots)
    stages = {
        "fusion": n * (inputs + fusion),
        "graph_attention": n_gat_layers * (per_edge + n * 6 * h),
        # three streams of width h through attention, norms and a 2h feed-forward
        "transformer": n * 3 * h * 16,
        "heads": n * 3 * g * 3,
        "propagation": n_iterations * (n * g * 6 + n * 6) + n * g * 4
        if training
        else n * g * 5 + n * 6,
    }
    parts = {k: v * FLOAT for k, v in stages.items()}
    if training:
        return MemoryEstimate({k: TRAINING_FACTOR * v for k, v in parts.items()})
    largest = max(parts, key=parts.__getitem__)
    kept = {"heads": parts["heads"], "propagation": parts["propagation"]}
    kept[largest] = parts[largest]
    return MemoryEstimate(kept)


def chunked_pass_bytes(
    n_obs: int, n_edges: int, chunk_size: int | None, *, n_members: int = 1, **sizes: Any
) -> MemoryEstimate:
    """Memory of an exact evaluation pass over a stack, ``chunk_size`` spots at a time.

    A chunk's network, the whole-stack streams and outputs of each of ``n_members``
    networks, and the propagation over the whole graph. ``sizes``: the keyword arguments of
    :func:`network_bytes` other than ``training``.
    """
    n_chunk = n_obs if chunk_size is None else min(chunk_size, n_obs)
    # in-edges of a chunk scale with its share of the spots
    chunk_edges = int(n_edges * n_chunk / max(n_obs, 1))
    chunk = network_bytes(n_chunk, chunk_edges, training=False, **sizes)
    # per member: (n, hidden) streams and embedding, (n, genes) outputs of the network and
    # the blend, each written into one whole-stack array (5 h + 6 genes wide, one more of
    # each as margin)
    whole = n_obs * n_members * (6 * sizes["hidden_dim"] + 7 * sizes["n_genes"])
    propagation = network_bytes(n_obs, n_edges, training=False, **sizes).parts["propagation"]
    return chunk + MemoryEstimate({"heads": whole * FLOAT, "propagation": propagation})


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes available now: free CUDA memory of ``device``, else available host RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil  # a dependency of distributed, itself a dependency of asign_sc

    return int(psutil.virtual_memory().available)


def memory_budget(max_memory_gb: float | None, device: torch.device | str = "cpu") -> int:
    """``max_memory_gb`` in bytes, or the available memory when ``None``."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GB)
    return available_memory(device)


def check_memory(estimate: MemoryEstimate, budget: float, *, what: str) -> None:
    """Raise :class:`InsufficientMemoryError` naming the setting to change if over budget.

    Parameters
    ----------
    estimate
        The estimated parts.
    budget
        Bytes available.
    what
        The computation, for the message (``"training on 12 000 spots"``).
    """
    logger.debug(
        "Memory estimate of %s: %s (budget %.2f GB).", what, estimate.describe(), budget / GB
    )
    if estimate.total <= budget:
        return
    largest = max(estimate.parts, key=estimate.parts.__getitem__)
    raise InsufficientMemoryError(
        f"{what} needs about {readable(estimate.total)} ({estimate.describe()}), more than "
        f"the {readable(budget)} available (TrainingConfig(max_memory_gb=...) sets the "
        f"budget). The largest part is {largest}: {HINTS[largest]}."
    )
