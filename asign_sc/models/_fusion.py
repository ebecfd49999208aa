"""Hierarchical fusion of multi-level image features (paper §III-C-1, eq. 2-3)."""

from __future__ import annotations

import torch
from torch import nn

from asign_sc.models._config import check_token_pooling

__all__ = ["MultiLevelFusion"]


class MultiLevelFusion(nn.Module):
    """Cross-attention of the spot embedding over region tokens and over global tokens.

    Each level is first projected to ``hidden_dim`` (the image encoders are frozen, so this
    projection is the trainable part of each branch, as in TRIPLEX). The projected spot
    embedding is the query of two multi-head cross-attention layers whose keys and values
    are the region tokens and the global tokens (eq. 2), giving ``f'_s`` and ``f''_s``;
    the output is ``F = concat(f_s, f'_s, f''_s)`` (eq. 3). Attention over a single key
    is the identity up to a linear map, so each level must bring at least two tokens.

    With ``cross_attention=False`` (the paper's "w.o Cross-atten" ablation, Table II) there
    is no attention: ``f'_s`` and ``f''_s`` are a linear map of the projected *mean* region
    and global token, i.e. close to what the attention would give with uniform weights (its
    value and output projections collapse into one linear map). ``F`` keeps its three
    blocks and its width, so everything downstream is unchanged; the region and global
    information still enters, but no longer weighted by its relevance to the spot. The
    tokens are averaged before the projection, so each level costs one projection per spot
    instead of one per token (9 for a 3 x 3 grid). Averaging the projected tokens instead
    scored no better on her2st patient C (per-gene PCC 0.270 / 0.263 against 0.271 / 0.264
    with C2 / C4 known, seeds 0-2) and made a training epoch of the scale benchmark's plain
    stacks longer (2.5 / 16.5 / 87 s against 1.9 / 15.2 / 83 s at 10,000 / 50,000 / 200,000
    spots; on the larger stacks the propagation and the backward pass weigh more).

    Parameters
    ----------
    spot_dim, region_dim, global_dim
        Embedding sizes of the three levels.
    hidden_dim
        Size of each projected level; ``F`` has ``3 * hidden_dim`` features.
    n_heads
        Attention heads; must divide ``hidden_dim``.
    dropout
        Dropout on the projections and the attention weights.
    cross_attention
        Fuse by cross-attention (default); ``False``: by mean-pooled tokens (see above).
    token_pooling
        Without cross-attention: ``"mean_then_project"`` (see above) or
        ``"project_then_mean"``, the mean of the projected tokens (models saved before the
        former existed).
    """

    def __init__(
        self,
        spot_dim: int,
        region_dim: int,
        global_dim: int,
        *,
        hidden_dim: int = 128,
        n_heads: int = 4,
        dropout: float = 0.1,
        cross_attention: bool = True,
        token_pooling: str = "mean_then_project",
    ) -> None:
        super().__init__()
        check_token_pooling(token_pooling)
        self.token_pooling = token_pooling
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by n_heads ({n_heads}).")
        self.hidden_dim = hidden_dim
        self.cross_attention = bool(cross_attention)
        self.proj_spot = _projection(spot_dim, hidden_dim, dropout)
        self.proj_region = _projection(region_dim, hidden_dim, dropout)
        self.proj_global = _projection(global_dim, hidden_dim, dropout)
        if self.cross_attention:
            self.attn_region = nn.MultiheadAttention(
                hidden_dim, n_heads, dropout=dropout, batch_first=True
            )
            self.attn_global = nn.MultiheadAttention(
                hidden_dim, n_heads, dropout=dropout, batch_first=True
            )
        else:
            self.pool_region = nn.Linear(hidden_dim, hidden_dim)
            self.pool_global = nn.Linear(hidden_dim, hidden_dim)

    @property
    def out_dim(self) -> int:
        """Size of the fused feature ``F``."""
        return 3 * self.hidden_dim

    def forward(
        self,
        spot: torch.Tensor,
        region_tokens: torch.Tensor,
        global_tokens: torch.Tensor,
        *,
        return_attention: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Fuse the three levels.

        Parameters
        ----------
        spot
            ``(n, spot_dim)`` spot-level embeddings.
        region_tokens, global_tokens
            ``(n, n_tokens, dim)`` token grids of the region and global windows
            (``n_tokens >= 2`` with cross-attention).
        return_attention
            Also return the attention weights, ``(n, n_heads, n_tokens)`` per level (only
            with cross-attention).

        Returns
        -------
        ``fused`` (``F``, ``(n, 3 * hidden_dim)``), the projected ``spot`` query, the
        mean projected ``region`` and ``global`` tokens (with ``cross_attention=False``:
        the projected mean tokens; the streams the transformer of
        :class:`~asign_sc.models.MSAGNet` mixes with the graph output), and optionally
        ``attention_region`` / ``attention_global``.
        """
        n = spot.shape[0]
        if return_attention and not self.cross_attention:
            raise ValueError(
                "return_attention=True needs cross-attention; this fusion was built with "
                "cross_attention=False (mean-pooled tokens, no attention weights)."
            )
        for name, tokens in (("region", region_tokens), ("global", global_tokens)):
            if tokens.ndim != 3 or tokens.shape[0] != n:
                raise ValueError(
                    f"{name}_tokens must have shape (n_spots={n}, n_tokens, dim), got "
                    f"{tuple(tokens.shape)}."
                )
            if self.cross_attention and tokens.shape[1] < 2:
                raise ValueError(
                    f"{name}_tokens has a single token per spot; cross-attention over one key "
                    "is a no-op. Extract features with a token grid (e.g. 2x2 or more) per "
                    "window."
                )
        f_s = self.proj_spot(spot)
        if not self.cross_attention and self.token_pooling == "mean_then_project":
            region = self.proj_region(region_tokens.mean(1))
            global_ = self.proj_global(global_tokens.mean(1))
        else:
            t_r, t_g = self.proj_region(region_tokens), self.proj_global(global_tokens)
            region, global_ = t_r.mean(1), t_g.mean(1)
        out = {"spot": f_s, "region": region, "global": global_}
        if not self.cross_attention:
            f_r, f_g = self.pool_region(region), self.pool_global(global_)
            out["fused"] = torch.cat([f_s, f_r, f_g], dim=-1)
            return out
        query = f_s.unsqueeze(1)
        f_r, w_r = self.attn_region(
            query, t_r, t_r, need_weights=return_attention, average_attn_weights=False
        )
        f_g, w_g = self.attn_global(
            query, t_g, t_g, need_weights=return_attention, average_attn_weights=False
        )
        out["fused"] = torch.cat([f_s, f_r.squeeze(1), f_g.squeeze(1)], dim=-1)
        if return_attention:
            out["attention_region"] = w_r.squeeze(2)
            out["attention_global"] = w_g.squeeze(2)
        return out


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout))
