"""Tools: registration, features, model fitting, imputation and evaluation."""

from asign_sc.tl._registration import register_sections

__all__ = ["register_sections"]
