"""Losses of ASIGN: multi-level prediction and consistency terms (paper eq. 7-9)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["ASIGNLoss", "LossWeights", "pcc_loss"]

PCCAxis = Literal["gene", "spot"]


def pcc_loss(
    pred: torch.Tensor, target: torch.Tensor, *, axis: PCCAxis = "gene", eps: float = 1e-8
) -> torch.Tensor:
    """One minus the mean Pearson correlation between ``pred`` and ``target``.

    Parameters
    ----------
    pred, target
        Arrays of shape ``(n_spots, n_genes)``.
    axis
        ``"gene"`` (default): one correlation per gene, computed across spots, then averaged
        over genes; this is the field's standard metric (TRIPLEX, HEST) and the one the
        evaluation reports. ``"spot"``: one correlation per spot across genes (the paper's
        per-spot PCC), averaged over spots.
    eps
        Added to the variances, so that a constant column contributes a correlation of 0
        (and a finite gradient) instead of NaN.

    Returns
    -------
    A scalar in ``[0, 2]``.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(
            f"pcc_loss needs two (n_spots, n_genes) arrays of equal shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}."
        )
    if axis not in ("gene", "spot"):
        raise ValueError(f"axis must be 'gene' or 'spot', got {axis!r}.")
    dim = 0 if axis == "gene" else 1
    p = pred - pred.mean(dim, keepdim=True)
    t = target - target.mean(dim, keepdim=True)
    cov = (p * t).mean(dim)
    r = cov / torch.sqrt((p.pow(2).mean(dim) + eps) * (t.pow(2).mean(dim) + eps))
    return 1.0 - r.mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the ASIGN loss, defaults from the paper (§III-E and §IV)."""

    lambda_s: float = 0.75
    """PCC term of the spot level in eq. 7."""
    lambda_r: float = 0.5
    """PCC term of the region level in eq. 7."""
    lambda_g: float = 0.5
    """PCC term of the global level in eq. 7."""
    lambda_1: float = 0.25
    """Spot-region consistency in eq. 8."""
    lambda_2: float = 0.25
    """Spot-global consistency in eq. 8."""
    gamma_1: float = 1.0
    """Weight of the prediction loss L_p in eq. 9."""
    gamma_2: float = 1.0
    """Weight of the consistency loss L_c in eq. 9."""
    pcc_axis: PCCAxis = "gene"
    """Axis of every PCC term, see :func:`pcc_loss`."""

    def to_dict(self) -> dict[str, float | str]:
        """Plain dict, for checkpoints and ``.uns``."""
        return asdict(self)


class ASIGNLoss(nn.Module):
    """The hybrid loss of eq. 9, ``L = γ1 L_p + γ2 L_c``.

    ``L_p = MSE(p_s, y_s) + Σ_{i∈{s,r,g}} λ_i P(p_i, y_i)`` (eq. 7) and
    ``L_c = λ1 P(p_s, p_r) + λ2 P(p_s, p_g)`` (eq. 8), with ``P`` = :func:`pcc_loss`.

    Parameters
    ----------
    weights
        The λ and γ hyper-parameters and the PCC axis.
    """

    def __init__(self, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()

    def forward(
        self,
        pred: dict[str, torch.Tensor],
        target: dict[str, torch.Tensor],
        *,
        consistency_pred: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Parameters
        ----------
        pred
            Predictions ``{"spot", "region", "global"}``, each ``(n, n_genes)``, on the
            supervised spots.
        target
            Targets with the same keys and shapes (eq. 10 for region and global).
        consistency_pred
            Predictions the consistency term L_c is computed on (it needs no labels, so it
            may cover more spots than ``pred``); default ``pred``.

        Returns
        -------
        The scalar loss and its parts (``mse``, ``pcc_spot``, ``pcc_region``, ``pcc_global``,
        ``prediction``, ``consistency``), detached.
        """
        w = self.weights
        axis = w.pcc_axis
        mse = nn.functional.mse_loss(pred["spot"], target["spot"])
        p_s = pcc_loss(pred["spot"], target["spot"], axis=axis)
        p_r = pcc_loss(pred["region"], target["region"], axis=axis)
        p_g = pcc_loss(pred["global"], target["global"], axis=axis)
        l_p = mse + w.lambda_s * p_s + w.lambda_r * p_r + w.lambda_g * p_g
        cons = consistency_pred if consistency_pred is not None else pred
        l_c = w.lambda_1 * pcc_loss(
            cons["spot"], cons["region"], axis=axis
        ) + w.lambda_2 * pcc_loss(cons["spot"], cons["global"], axis=axis)
        total = w.gamma_1 * l_p + w.gamma_2 * l_c
        parts = {
            "mse": mse,
            "pcc_spot": p_s,
            "pcc_region": p_r,
            "pcc_global": p_g,
            "prediction": l_p,
            "consistency": l_c,
        }
        return total, {k: v.detach() for k, v in parts.items()}
