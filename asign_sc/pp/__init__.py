"""Preprocessing: tissue masks, image channels, gene selection and normalisation."""

from asign_sc.pp._patches import crop_windows
from asign_sc.pp._tissue import tissue_channel, tissue_mask

__all__ = ["crop_windows", "tissue_channel", "tissue_mask"]
