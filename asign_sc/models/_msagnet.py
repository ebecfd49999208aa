"""MSAGNet: multi-level fusion, spatial-aware graph attention and regression heads (§III-C)."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GATConv, GATv2Conv

from asign_sc._keys import LEVELS
from asign_sc._utils import by_row_chunks
from asign_sc.models._fusion import MultiLevelFusion
from asign_sc.models._sampling import message_passing_chunks

__all__ = ["MSAGNet", "SpatialGraphAttention", "SpotwiseLayers"]


class SpatialGraphAttention(nn.Module):
    """Stacked graph-attention rounds over the 3D spot graph (eq. 4).

    Each round is a multi-head :class:`~torch_geometric.nn.GATConv` (eq. 4) or
    :class:`~torch_geometric.nn.GATv2Conv` whose attention also sees the edge weight of
    the 3D graph (``edge_dim=1``); the outputs of all rounds are concatenated and projected
    back to ``hidden_dim``.

    Parameters
    ----------
    in_dim
        Node feature size (``F`` of the fusion, ``3 * hidden_dim``).
    hidden_dim
        Output size of every round (``n_heads`` heads of ``hidden_dim // n_heads``).
    n_layers
        Number of rounds (paper: 3).
    n_heads
        Attention heads per round; must divide ``hidden_dim``.
    dropout
        Dropout on the attention coefficients and between rounds.
    variant
        ``"gat"`` (:class:`~torch_geometric.nn.GATConv`) or ``"gatv2"``
        (:class:`~torch_geometric.nn.GATv2Conv`).
    """

    def __init__(
        self,
        in_dim: int,
        *,
        hidden_dim: int = 128,
        n_layers: int = 3,
        n_heads: int = 4,
        dropout: float = 0.1,
        variant: str = "gat",
    ) -> None:
        super().__init__()
        layers = {"gat": GATConv, "gatv2": GATv2Conv}
        if variant not in layers:
            raise ValueError(f"variant must be 'gat' or 'gatv2', got {variant!r}.")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}.")
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by n_heads ({n_heads}).")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        self.convs = nn.ModuleList(
            layers[variant](
                d,
                hidden_dim // n_heads,
                heads=n_heads,
                concat=True,
                dropout=dropout,
                edge_dim=1,
                add_self_loops=True,
                fill_value="mean",
            )
            for d in dims
        )
        self.act = nn.ELU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(n_layers * hidden_dim, hidden_dim)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> torch.Tensor:
        """Run the rounds.

        Parameters
        ----------
        x
            ``(n, in_dim)`` node features.
        edge_index
            ``(2, n_edges)`` source (neighbour ``j``) and target (spot ``i``) indices.
        edge_weight
            ``(n_edges,)`` weights ``e_ij`` of the 3D graph.

        Returns
        -------
        ``(n, hidden_dim)`` node embeddings.
        """
        edge_attr = edge_weight.reshape(-1, 1).to(x.dtype)
        rounds = []
        h = x
        for conv in self.convs:
            h = self.dropout(self.act(conv(h, edge_index, edge_attr)))
            rounds.append(h)
        return self.out(torch.cat(rounds, dim=-1))

    @torch.no_grad()
    def forward_layerwise(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        *,
        chunk_size: int,
    ) -> torch.Tensor:
        """:meth:`forward` in evaluation mode, one round at a time over chunks of targets.

        Each round runs on chunks of ``chunk_size`` target spots with all their in-edges
        (:func:`~asign_sc.models._sampling.message_passing_chunks`), so memory is bounded by
        a chunk's edges x heads instead of the whole graph's; the result equals
        :meth:`forward` up to float summation order.
        """
        if self.training:
            raise RuntimeError("forward_layerwise is for evaluation; call .eval() first.")
        chunks = message_passing_chunks(edge_index, edge_weight, x.shape[0], chunk_size)
        rounds = []
        h = x
        for conv in self.convs:
            out = h.new_empty(h.shape[0], conv.heads * conv.out_channels)
            for chunk in chunks:
                local = conv(
                    h[chunk.nodes], chunk.edge_index, chunk.edge_weight.reshape(-1, 1).to(h.dtype)
                )
                out[chunk.targets] = self.act(local[: len(chunk.targets)])
            rounds.append(out)
            h = out
        return by_row_chunks(
            lambda rows: self.out(torch.cat([r[rows] for r in rounds], dim=-1)),
            x.shape[0],
            chunk_size,
        )


class SpotwiseLayers(nn.Module):
    """Stand-in for :class:`SpatialGraphAttention` without message passing.

    The paper's "w.o GAT" ablation (Table II): every graph-attention round is replaced by a
    linear layer of the same width applied to each spot on its own (ELU and dropout as
    before), the rounds' outputs are concatenated and projected back to ``hidden_dim``
    exactly as in :class:`SpatialGraphAttention`. A spot's output therefore depends on its
    own features only; the 3D graph is still used by the cross-layer imputation.

    Parameters
    ----------
    in_dim
        Node feature size.
    hidden_dim
        Output size of every layer.
    n_layers
        Number of layers (the depth of the graph attention it replaces).
    dropout
        Dropout between layers.
    """

    def __init__(
        self, in_dim: int, *, hidden_dim: int = 128, n_layers: int = 3, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}.")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(d, hidden_dim) for d in dims)
        self.act = nn.ELU()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(n_layers * hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` node features -> ``(n, hidden_dim)`` embeddings, spot by spot."""
        rounds = []
        h = x
        for layer in self.layers:
            h = self.dropout(self.act(layer(h)))
            rounds.append(h)
        return self.out(torch.cat(rounds, dim=-1))


class MSAGNet(nn.Module):
    """Multi-level spatial-aware graph network of ASIGN.

    ``MultiLevelFusion`` (cross-attention of the spot query over region and global tokens)
    gives ``F``; :class:`SpatialGraphAttention` spreads ``F`` over the 3D graph; a
    Transformer encoder layer then attends across the three streams (graph output, region
    stream, global stream) of each spot, and one linear regression head per level predicts
    spot, region and global expression.

    Two switches remove a block for the paper's ablations (Table II), keeping every width:
    ``cross_attention=False`` fuses the levels without attention (mean-pooled tokens, see
    :class:`~asign_sc.models.MultiLevelFusion`); ``graph_attention=False`` replaces the
    graph attention by :class:`SpotwiseLayers` of the same depth and width, so the network
    sees no neighbours (the transformer across a spot's own three streams stays).

    Parameters
    ----------
    spot_dim, region_dim, global_dim
        Embedding sizes of the three levels.
    n_genes
        Number of predicted genes.
    hidden_dim
        Width of every hidden representation.
    n_gat_layers
        Graph-attention rounds (paper: 3); without graph attention, the number of
        spot-wise layers replacing them.
    n_heads
        Heads of the cross-attention, graph-attention and transformer layers.
    dropout
        Dropout everywhere.
    cross_attention
        Fuse the levels by cross-attention (default) or by mean-pooled tokens.
    token_pooling
        How mean-pooled tokens are pooled, see :class:`~asign_sc.models.MultiLevelFusion`.
    graph_attention
        Spread features over the 3D graph by graph attention (default) or not at all.
    gat_variant
        The graph-attention layer, ``"gat"`` or ``"gatv2"`` (see
        :class:`SpatialGraphAttention`).
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
    ) -> None:
        super().__init__()
        self.fusion = MultiLevelFusion(
            spot_dim,
            region_dim,
            global_dim,
            hidden_dim=hidden_dim,
            n_heads=n_heads,
            dropout=dropout,
            cross_attention=cross_attention,
            token_pooling=token_pooling,
        )
        self.graph_attention = bool(graph_attention)
        if self.graph_attention:
            self.gat = SpatialGraphAttention(
                self.fusion.out_dim,
                hidden_dim=hidden_dim,
                n_layers=n_gat_layers,
                n_heads=n_heads,
                dropout=dropout,
                variant=gat_variant,
            )
        else:
            self.spotwise = SpotwiseLayers(
                self.fusion.out_dim, hidden_dim=hidden_dim, n_layers=n_gat_layers, dropout=dropout
            )
        self.level_embedding = nn.Parameter(torch.zeros(3, hidden_dim))
        self.transformer = nn.TransformerEncoderLayer(
            hidden_dim,
            n_heads,
            dim_feedforward=2 * hidden_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.heads = nn.ModuleDict({level: nn.Linear(hidden_dim, n_genes) for level in LEVELS})
        self.hidden_dim = hidden_dim
        self.n_genes = n_genes

    def set_output_bias(self, mean: dict[str, torch.Tensor]) -> None:
        """Start every head at a per-gene mean (faster, more stable full-graph training)."""
        with torch.no_grad():
            for level, value in mean.items():
                self.heads[level].bias.copy_(value)

    def forward(
        self,
        spot: torch.Tensor,
        region_tokens: torch.Tensor,
        global_tokens: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Predict expression at the three levels.

        Parameters
        ----------
        spot
            ``(n, spot_dim)`` spot embeddings.
        region_tokens, global_tokens
            ``(n, n_tokens, dim)`` token grids.
        edge_index, edge_weight
            The 3D graph, see :class:`SpatialGraphAttention` (unused without graph
            attention).

        Returns
        -------
        ``spot``, ``region``, ``global`` predictions ``(n, n_genes)`` and ``embedding``
        ``(n, hidden_dim)``, the spot stream after the transformer (input of the node
        weights and the blend of cross-layer imputation).
        """
        fused = self.fusion(spot, region_tokens, global_tokens)
        if self.graph_attention:
            graph = self.gat(fused["fused"], edge_index, edge_weight)
        else:
            graph = self.spotwise(fused["fused"])
        return self._decode(graph, fused["region"], fused["global"])

    def _decode(
        self, graph: torch.Tensor, region: torch.Tensor, global_: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The three streams through the transformer and the heads (``embedding``: spot stream)."""
        streams = torch.stack([graph, region, global_], dim=1)
        streams = self.transformer(streams + self.level_embedding)
        out = {level: self.heads[level](streams[:, i]) for i, level in enumerate(LEVELS)}
        out["embedding"] = streams[:, 0]
        return out

    @torch.no_grad()
    def forward_layerwise(
        self,
        spot: torch.Tensor,
        region_tokens: torch.Tensor,
        global_tokens: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        *,
        chunk_size: int,
    ) -> dict[str, torch.Tensor]:
        """:meth:`forward` in evaluation mode with memory bounded by ``chunk_size`` spots.

        The fusion (spots x tokens x features, the largest tensors), the transformer and the
        heads run on ``chunk_size`` spots at a time; the graph attention round by round over
        chunks of targets (:meth:`SpatialGraphAttention.forward_layerwise`). Only
        ``(n, hidden_dim)`` streams are held for the whole stack. Equal to :meth:`forward` up
        to float summation order.
        """
        if self.training:
            raise RuntimeError("forward_layerwise is for evaluation; call .eval() first.")
        n = spot.shape[0]
        streams_in = by_row_chunks(
            lambda rows: self.fusion(spot[rows], region_tokens[rows], global_tokens[rows]),
            n,
            chunk_size,
        )
        if self.graph_attention:
            graph = self.gat.forward_layerwise(
                streams_in.pop("fused"), edge_index, edge_weight, chunk_size=chunk_size
            )
        else:
            fused = streams_in.pop("fused")
            graph = by_row_chunks(lambda rows: self.spotwise(fused[rows]), n, chunk_size)
            del fused
        return by_row_chunks(
            lambda rows: self._decode(
                graph[rows], streams_in["region"][rows], streams_in["global"][rows]
            ),
            n,
            chunk_size,
        )
