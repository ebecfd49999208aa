"""Preprocessing: tissue masks, image channels, gene selection and normalisation."""

from asign_sc.pp._expression import expression_targets, log_normalize, select_genes
from asign_sc.pp._patches import crop_windows
from asign_sc.pp._tissue import tissue_channel, tissue_mask

__all__: list[str] = [
    "crop_windows",
    "expression_targets",
    "log_normalize",
    "select_genes",
    "tissue_channel",
    "tissue_mask",
]
