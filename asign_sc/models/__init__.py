"""Torch modules: encoders, MSAGNet, cross-layer imputation, losses."""

from asign_sc.models import encoders

__all__ = ["encoders"]
