"""Tools: registration, features, model fitting, imputation and evaluation."""

from asign_sc.tl._evaluate import evaluate
from asign_sc.tl._features import extract_features
from asign_sc.tl._fit import fit_asign
from asign_sc.tl._impute import impute
from asign_sc.tl._registration import register_sections

__all__: list[str] = ["evaluate", "extract_features", "fit_asign", "impute", "register_sections"]
