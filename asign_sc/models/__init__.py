"""Torch modules: encoders, MSAGNet, cross-layer imputation, losses."""

from asign_sc.models import encoders
from asign_sc.models._asign import ASIGNEnsemble, ASIGNModel, ASIGNNet
from asign_sc.models._fusion import MultiLevelFusion
from asign_sc.models._losses import ASIGNLoss, LossWeights, pcc_loss
from asign_sc.models._msagnet import MSAGNet, SpatialGraphAttention, SpotwiseLayers
from asign_sc.models._propagation import CrossLayerImputation, PropagationResult, propagate_labels

__all__: list[str] = [
    "ASIGNEnsemble",
    "ASIGNLoss",
    "ASIGNModel",
    "ASIGNNet",
    "CrossLayerImputation",
    "LossWeights",
    "MSAGNet",
    "MultiLevelFusion",
    "PropagationResult",
    "SpatialGraphAttention",
    "SpotwiseLayers",
    "encoders",
    "pcc_loss",
    "propagate_labels",
]
