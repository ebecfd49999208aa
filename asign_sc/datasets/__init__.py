"""Datasets: a synthetic section stack with ground truth."""

from asign_sc.datasets._synthetic import SyntheticTruth, synthetic_stack

__all__ = ["SyntheticTruth", "synthetic_stack"]
