"""The model core: configs, data, torch modules (encoders, MSAGNet, CLI), training, the model."""

from asign_sc.models import encoders
from asign_sc.models._asign import ASIGNEnsemble, ASIGNNet
from asign_sc.models._config import ArchitectureConfig, TrainingConfig
from asign_sc.models._data import GraphInputs, StackData
from asign_sc.models._distributed import DistributedTrainingError
from asign_sc.models._fusion import MultiLevelFusion
from asign_sc.models._losses import ASIGNLoss, LossWeights, pcc_loss
from asign_sc.models._memory import InsufficientMemoryError
from asign_sc.models._model import ASIGNModel
from asign_sc.models._msagnet import MSAGNet, SpatialGraphAttention, SpotwiseLayers
from asign_sc.models._propagation import CrossLayerImputation, PropagationResult, propagate_labels
from asign_sc.models._training import TrainingPlan, fit_ensemble

__all__: list[str] = [
    "ASIGNEnsemble",
    "ASIGNLoss",
    "ASIGNModel",
    "ASIGNNet",
    "ArchitectureConfig",
    "CrossLayerImputation",
    "DistributedTrainingError",
    "GraphInputs",
    "InsufficientMemoryError",
    "LossWeights",
    "MSAGNet",
    "MultiLevelFusion",
    "PropagationResult",
    "SpatialGraphAttention",
    "SpotwiseLayers",
    "StackData",
    "TrainingConfig",
    "TrainingPlan",
    "encoders",
    "fit_ensemble",
    "pcc_loss",
    "propagate_labels",
]
