"""Tools: registration, features, model fitting, imputation and evaluation."""

from asign_sc.tl._features import extract_features
from asign_sc.tl._registration import register_sections

__all__ = ["extract_features", "register_sections"]
