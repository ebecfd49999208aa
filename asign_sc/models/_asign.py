"""The full ASIGN network (MSAGNet + cross-layer imputation) and its ensemble."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from asign_sc.models._msagnet import MSAGNet
from asign_sc.models._propagation import CrossLayerImputation

__all__ = ["ASIGNEnsemble", "ASIGNNet", "PCAReduction"]

AVERAGED = ("spot", "region", "global", "prediction", "propagated", "gate", "node_weights")
"""Outputs of :class:`ASIGNNet` that :class:`ASIGNEnsemble` averages over its members."""


class PCAReduction(nn.Module):
    """A fixed (not trained) PCA projection of one feature level, stored with the model.

    Image embeddings are wide (1024-2048) and a stack has a few thousand spots, so the
    first, learned projection of each level would dominate compute and over-fit; a PCA
    fitted once on the training stack's (standardised) features, applied before training
    and at prediction, keeps the informative directions. Its parameters are buffers, so
    they travel in the checkpoint.

    Parameters
    ----------
    in_dim
        Feature size.
    n_components
        Kept components (at most ``in_dim``).
    """

    def __init__(self, in_dim: int, n_components: int) -> None:
        super().__init__()
        if not 1 <= n_components <= in_dim:
            raise ValueError(f"n_components must lie in [1, {in_dim}], got {n_components}.")
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("components", torch.eye(in_dim)[:, :n_components].clone())
        self.register_buffer("scale", torch.ones(n_components))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, max_rows: int = 50_000, seed: int = 0) -> PCAReduction:
        """Fit on ``(..., in_dim)`` features (at most ``max_rows`` rows, drawn with ``seed``)."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if flat.shape[0] > max_rows:
            g = torch.Generator().manual_seed(seed)
            flat = flat[torch.randperm(flat.shape[0], generator=g)[:max_rows].to(flat.device)]
        mean = flat.mean(0)
        k = self.components.shape[1]
        sv, comps = _top_singular(flat - mean, k)
        # deterministic signs: largest loading of each component positive
        signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True))).squeeze(0)
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        std = sv[:k] / max(flat.shape[0] - 1, 1) ** 0.5
        self.mean.copy_(mean)
        self.components.copy_(comps)
        # one scale for all components (relative variances kept, no noise amplification)
        rms = std.pow(2).mean().sqrt()
        self.scale.fill_(float(rms) if rms > 1e-8 else 1.0)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``(..., in_dim)`` to ``(..., n_components)`` scores of unit mean variance."""
        return ((x - self.mean) @ self.components) / self.scale


def _top_singular(centred: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest singular values of ``centred`` and its right singular vectors.

    From the eigendecomposition (in float64) of the smaller Gram matrix, ``X^T X`` or
    ``X X^T``, instead of a full SVD: the same leading components (singular values to 2e-6
    relative, vectors to |cos| > 0.999999 on 1,280-d image features) 3-6x faster on CPU at
    910-50,000 rows, the sizes fits see. Directions without variance (fewer rows or a lower
    rank than ``k``) get zero vectors.
    """
    rows, cols = centred.shape
    if rows >= cols:
        values, vectors = torch.linalg.eigh((centred.T @ centred).double())
        values, right = values.flip(0)[:k], vectors.flip(1)[:, :k]
    else:
        values, vectors = torch.linalg.eigh((centred @ centred.T).double())
        values, left = values.flip(0)[:k], vectors.flip(1)[:, :k]
        # directions without variance (rank below k: eigenvalues at the Gram matrix's
        # round-off) get zero vectors instead of amplified round-off
        floor = values[0].clamp_min(1e-300) * torch.finfo(centred.dtype).eps * max(rows, cols)
        weight = torch.where(values > floor, values, torch.inf)
        right = (centred.T.double() @ left) / weight.sqrt()
    singular = values.clamp_min(0.0).sqrt()
    return singular.to(centred.dtype), right.to(centred.dtype)


class ASIGNNet(nn.Module):
    """MSAGNet followed by the cross-layer imputation block.

    Parameters
    ----------
    spot_dim, region_dim, global_dim
        Embedding sizes of the three image levels.
    n_genes
        Number of modelled genes.
    hidden_dim, n_gat_layers, n_heads, dropout, cross_attention, graph_attention, gat_variant
        See :class:`~asign_sc.models.MSAGNet` (the switches remove a block for ablations;
        both default to the full network).
    token_pooling
        See :class:`~asign_sc.models.MultiLevelFusion` (without cross-attention only).
    n_iterations, learn_node_weights
        See :class:`~asign_sc.models.CrossLayerImputation`.
    n_components
        Reduce each level's features to this many principal components
        (:class:`PCAReduction`) before the network; ``None`` keeps them. The forward pass
        takes *reduced* features: call :meth:`reduce` on raw ones.
    """

    def __init__(
        self,
        spot_dim: int,
        region_dim: int,
        global_dim: int,
        n_genes: int,
        *,
        hidden_dim: int = 128,
        n_gat_layers: int = 3,
        n_heads: int = 4,
        dropout: float = 0.1,
        cross_attention: bool = True,
        token_pooling: str = "mean_then_project",
        graph_attention: bool = True,
        gat_variant: str = "gat",
        n_iterations: int = 10,
        learn_node_weights: bool = True,
        n_components: int | None = None,
    ) -> None:
        super().__init__()
        # widths, depths and blocks the memory estimates and the mini-batch closure read
        self.sizes = {
            "hidden_dim": hidden_dim,
            "n_heads": n_heads,
            "n_gat_layers": n_gat_layers,
            "n_iterations": n_iterations,
            "n_genes": n_genes,
            "gat_variant": gat_variant,
            "cross_attention": bool(cross_attention),
            "token_pooling": token_pooling,
            "graph_attention": bool(graph_attention),
        }
        # rounds of message passing in the network (0 without graph attention)
        self.message_passing_rounds = n_gat_layers if graph_attention else 0
        dims = {"spot": spot_dim, "region": region_dim, "global": global_dim}
        if n_components is None:
            self.reduction = None
        else:
            self.reduction = nn.ModuleDict(
                {k: PCAReduction(d, min(n_components, d)) for k, d in dims.items()}
            )
            dims = {k: min(n_components, d) for k, d in dims.items()}
        self.network = MSAGNet(
            dims["spot"],
            dims["region"],
            dims["global"],
            n_genes,
            hidden_dim=hidden_dim,
            n_gat_layers=n_gat_layers,
            n_heads=n_heads,
            dropout=dropout,
            cross_attention=cross_attention,
            token_pooling=token_pooling,
            graph_attention=graph_attention,
            gat_variant=gat_variant,
        )
        self.imputation = CrossLayerImputation(
            hidden_dim, n_genes, n_iterations=n_iterations, learn_node_weights=learn_node_weights
        )

    def fit_reduction(self, features: Mapping[str, torch.Tensor], *, seed: int = 0) -> None:
        """Fit the PCA of every level on ``{"spot", "region", "global"}`` features."""
        if self.reduction is not None:
            for level, module in self.reduction.items():
                module.fit(features[level], seed=seed)

    def reduce(self, level: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the level's PCA (identity without reduction)."""
        return x if self.reduction is None else self.reduction[level](x)

    def forward(
        self,
        spot: torch.Tensor,
        region_tokens: torch.Tensor,
        global_tokens: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        adjacency: torch.Tensor,
        values: torch.Tensor,
        known: torch.Tensor,
        *,
        return_spread: bool = False,
        chunk_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the network, then propagate ``values`` of ``known`` spots and blend.

        With ``chunk_size`` (evaluation only) the network runs in chunks of that many spots
        (:meth:`~asign_sc.models.MSAGNet.forward_layerwise`: exact, bounded memory); the
        propagation always runs over the whole graph.

        Returns
        -------
        The network outputs (``spot``, ``region``, ``global``, ``embedding``) and those of
        :class:`~asign_sc.models.CrossLayerImputation` (``prediction``, ``propagated``,
        ``coverage``, ``gate``, ``node_weights``).
        """
        if chunk_size is not None and chunk_size < spot.shape[0]:
            out = self.network.forward_layerwise(
                spot, region_tokens, global_tokens, edge_index, edge_weight, chunk_size=chunk_size
            )
        else:
            out = self.network(spot, region_tokens, global_tokens, edge_index, edge_weight)
        out.update(
            self.imputation(
                out["embedding"], adjacency, values, known, out["spot"], return_spread=return_spread
            )
        )
        return out


class ASIGNEnsemble(nn.Module):
    """Several :class:`ASIGNNet` trained with different seeds and held-out spots, averaged.

    A single known section gives a few hundred training spots, so one network's predictions
    depend noticeably on its initialisation and validation split; averaging a few members
    reduces that variance, and their spread is a per-spot, per-gene uncertainty. All members
    share one feature reduction (PCA).

    Parameters
    ----------
    n_models
        Number of members.
    **kwargs
        Arguments of :class:`ASIGNNet`.
    """

    def __init__(self, *args: Any, n_models: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if n_models < 1:
            raise ValueError(f"n_models must be at least 1, got {n_models}.")
        self.members = nn.ModuleList(ASIGNNet(*args, **kwargs) for _ in range(n_models))

    def fit_reduction(self, features: Mapping[str, torch.Tensor], *, seed: int = 0) -> None:
        """Fit the shared PCA (see :meth:`ASIGNNet.fit_reduction`)."""
        first = self.members[0]
        first.fit_reduction(features, seed=seed)
        if first.reduction is not None:
            for member in self.members[1:]:
                member.reduction.load_state_dict(first.reduction.state_dict())

    def reduce(self, level: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the shared PCA of a level."""
        return self.members[0].reduce(level, x)

    def forward(self, *args: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run every member (arguments of :meth:`ASIGNNet.forward`) and average.

        Returns
        -------
        The averaged outputs of :class:`ASIGNNet` (``coverage`` and ``known_share`` come
        from the first member: they depend on the graph, barely on the node weights), and
        with several members ``prediction_std`` and ``spot_std``, their spread.
        """
        outs = [member(*args, **kwargs) for member in self.members]
        first = outs[0]
        if len(outs) == 1:
            return first
        merged = dict(first)
        for key in AVERAGED:
            stacked = torch.stack([o[key] for o in outs])
            merged[key] = stacked.mean(0)
            if key in ("prediction", "spot"):
                merged[f"{key}_std"] = stacked.std(0)
        return merged
