"""Accuracy metrics of an imputation against measured expression.

Both inputs are ``(n_spots, n_genes)`` arrays on the same (normalised) scale. Correlations of
a constant vector are undefined: they come back as NaN and are counted by the caller, never
silently turned into 0.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["mae_per_gene", "mse_per_gene", "pcc_per_gene", "pcc_per_spot", "spearman_per_gene"]


def _pearson(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"truth and prediction differ in shape: {a.shape} vs {b.shape}.")
    defined = _varies(a, axis) & _varies(b, axis)
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    norm = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    out = np.full(norm.shape, np.nan)
    np.divide((a * b).sum(axis=axis), norm, out=out, where=defined)
    return np.clip(out, -1.0, 1.0, where=defined, out=out)


def _varies(x: np.ndarray, axis: int) -> np.ndarray:
    """Whether a vector varies beyond rounding error relative to its own magnitude."""
    spread = x.max(axis=axis) - x.min(axis=axis)
    magnitude = np.abs(x).max(axis=axis)
    return spread > 1e-9 * np.maximum(magnitude, np.finfo(float).tiny)


def pcc_per_gene(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson correlation across spots, one value per gene (NaN for a constant gene)."""
    return _pearson(truth, pred, axis=0)


def pcc_per_spot(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson correlation across genes, one value per spot (the ASIGN paper's metric)."""
    return _pearson(truth, pred, axis=1)


def spearman_per_gene(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Spearman rank correlation across spots, one value per gene."""
    return _pearson(rankdata(truth, axis=0), rankdata(pred, axis=0), axis=0)


def mse_per_gene(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean squared error across spots, one value per gene."""
    return np.mean((np.asarray(truth, float) - np.asarray(pred, float)) ** 2, axis=0)


def mae_per_gene(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean absolute error across spots, one value per gene."""
    return np.mean(np.abs(np.asarray(truth, float) - np.asarray(pred, float)), axis=0)
