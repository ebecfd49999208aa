"""Plotting."""

from asign_sc.pl._metrics import metrics
from asign_sc.pl._registration import registration
from asign_sc.pl._sections import sections
from asign_sc.pl._stack3d import stack_3d
from asign_sc.pl._training import training

__all__: list[str] = ["metrics", "registration", "sections", "stack_3d", "training"]
