"""Graphs: the 3D spot graph."""

from asign_sc.gr._build import build_3d_graph
from asign_sc.gr._kernel import gaussian_overlap
from asign_sc.gr._overlap import circle_intersection_area, circle_iou
from asign_sc.gr._split import split_graph

__all__: list[str] = [
    "build_3d_graph",
    "circle_intersection_area",
    "circle_iou",
    "gaussian_overlap",
    "split_graph",
]
