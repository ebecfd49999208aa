"""Typed settings of ASIGN: the network's architecture and how it is trained.

Both are frozen dataclasses validated once, on construction; ``to_dict``/``from_dict`` give
the plain-JSON form stored in model folders and in ``uns[key_added]["fit"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from asign_sc.models._losses import LossWeights

__all__ = ["ArchitectureConfig", "TrainingConfig"]

Optimizer = Literal["adamw", "sgd"]
Validation = Literal["random", "blocked"]
GATVariant = Literal["gat", "gatv2"]
TokenPooling = Literal["mean_then_project", "project_then_mean"]
TOKEN_POOLINGS: tuple[str, ...] = get_args(TokenPooling)
Standardize = Literal["section"] | None
BatchSize = int | Literal["auto"] | None

MIN_BATCH_SIZE = 32
"""Fewest seed spots of a mini-batch (the PCC terms of the loss need a few dozen spots)."""


def _check_fraction(name: str, value: float, *, closed_low: bool) -> None:
    low_ok = value >= 0 if closed_low else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def _check_positive_int(name: str, value: Any, *, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.{hint}")


def check_token_pooling(value: Any) -> None:
    """Raise unless ``value`` is one of :data:`TOKEN_POOLINGS`."""
    if value not in TOKEN_POOLINGS:
        raise ValueError(f"token_pooling must be one of {TOKEN_POOLINGS}, got {value!r}.")


class _Config:
    """``to_dict``/``from_dict`` shared by the configs."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (nested dataclasses become dicts)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Build from :meth:`to_dict`'s output; unknown keys are an error, missing ones default."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} settings {unknown}; known: {sorted(names)}.")
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class ArchitectureConfig(_Config):
    """Architecture of MSAGNet and the cross-layer imputation (paper §III).

    Parameters
    ----------
    hidden_dim
        Width of the fused spot representation and of every graph-attention round.
    n_gat_layers
        Graph-attention rounds (spot-wise layers with ``graph_attention=False``).
    n_heads
        Attention heads of the cross-attention and graph-attention layers.
    dropout
        Dropout inside the network.
    cross_attention
        Fuse spot, region and global features by cross-attention (eq. 2-3). ``False`` (the
        default) is the paper's "w.o Cross-atten" ablation: region/global enter as a linear
        map of their mean token.
    token_pooling
        Without cross-attention, how a level's tokens become one vector:
        ``"mean_then_project"`` (default) projects their mean, ``"project_then_mean"``
        averages their projections (one projection per token, 9 for a 3 x 3 grid: slower,
        and no better on her2st patient C; models saved before this setting existed were
        built so and load with it).
    graph_attention
        Spread features over the 3D graph by graph-attention rounds (eq. 4). ``False`` (the
        default) is the paper's "w.o GAT" ablation: spot-wise layers of the same depth and
        width; the 3D graph still carries the cross-layer imputation.

        Both attention blocks are off by default because on her2st patient C the network
        without them transfers better to the unknown sections with either section known
        (3 seeds each), in a third of the fitting time (see the accuracy benchmark);
        :meth:`paper` gives the paper's MSAGNet.
    gat_variant
        The graph-attention layer: ``"gat"``, the paper's eq. 4 (Veličković et al.,
        :class:`~torch_geometric.nn.GATConv`: attention from a sum of per-spot scores), or
        ``"gatv2"`` (Brody et al., :class:`~torch_geometric.nn.GATv2Conv`: attention from
        a per-edge hidden vector, about twice the cost per edge).
    n_iterations
        Propagation steps ``T`` of the cross-layer imputation (eq. 5-6; paper: 10).
    learn_node_weights
        Learn the propagation's node weights ``α_j`` from node embeddings (else fixed).
    n_components
        Reduce each level's standardised features to this many principal components, fitted
        on the training stack and stored in the model; ``None`` feeds the full embeddings
        (slower, and more prone to over-fit a single known section).
    ridge_member
        Weight of a linear member in the final prediction of ``impute(method="asign")``:
        closed-form ridge regression from the pooled image features (fitted on the known
        spots at imputation, penalty by exact leave-one-out), spread over the 3D graph from
        the measured spots (``method="ridge_propagation"``). The prediction is
        ``ridge_member * linear + (1 - ridge_member) * networks``. The two families err
        differently, so their average is better than either on her2st (see the accuracy
        benchmark); ``0`` gives the paper's ASIGN. ``method="network"`` never uses it.
    """

    hidden_dim: int = 128
    n_gat_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.1
    cross_attention: bool = False
    token_pooling: TokenPooling = "mean_then_project"
    graph_attention: bool = False
    gat_variant: GATVariant = "gat"
    n_iterations: int = 10
    learn_node_weights: bool = True
    n_components: int | None = 64
    ridge_member: float = 0.5

    @classmethod
    def paper(cls, **overrides: Any) -> ArchitectureConfig:
        """The paper's ASIGN: cross-attention, GAT layers (eq. 4), no linear member.

        Parameters
        ----------
        **overrides
            Other settings, e.g. ``hidden_dim``.

        Examples
        --------
        >>> ArchitectureConfig.paper().graph_attention
        True
        """
        settings = {
            "cross_attention": True,
            "graph_attention": True,
            "gat_variant": "gat",
            "ridge_member": 0.0,
        }
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        _check_positive_int("hidden_dim", self.hidden_dim)
        if isinstance(self.ridge_member, bool) or not 0 <= self.ridge_member < 1:
            raise ValueError(
                f"ridge_member must lie in [0, 1) (0: networks only), got {self.ridge_member!r}."
            )
        _check_positive_int("n_heads", self.n_heads)
        _check_positive_int("n_iterations", self.n_iterations)
        for name in ("cross_attention", "graph_attention", "learn_node_weights"):
            _check_bool(name, getattr(self, name))
        what = "graph-attention rounds" if self.graph_attention else "spot-wise layers"
        _check_positive_int(
            "n_gat_layers",
            self.n_gat_layers,
            hint=f" It is the number of {what}; to train without graph attention pass "
            "graph_attention=False.",
        )
        check_token_pooling(self.token_pooling)
        if self.gat_variant not in ("gat", "gatv2"):
            raise ValueError(f"gat_variant must be 'gat' or 'gatv2', got {self.gat_variant!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.n_components is not None:
            _check_positive_int("n_components", self.n_components, hint=" Or None.")


@dataclass(frozen=True)
class TrainingConfig(_Config):
    """How ASIGN is trained, and the data choices a fitted model repeats at prediction.

    Parameters
    ----------
    lr
        Learning rate; default ``1e-3`` for AdamW, ``1e-2`` for SGD. Decays by a cosine
        schedule to 1% of it (paper).
    weight_decay
        Weight decay (paper: ``1e-4``).
    optimizer
        ``"adamw"`` (default; converges in a few hundred full-graph steps) or ``"sgd"`` with
        momentum 0.9, as in the paper.
    mask_fraction
        Share of the training spots hidden from the propagation input and supervised in each
        epoch (paper: 20% of labels known, so 0.8).
    validation_fraction
        Share of the known spots held out for early stopping (0 disables validation).
    validation
        How the held-out spots are drawn: ``"random"`` spots of the known sections, each
        surrounded by training spots, so early stopping measures interpolation within a
        section; or ``"blocked"``: a few contiguous patches of each known section, with a
        ring of ``validation_buffer`` spot pitches around them left out of training, so the
        held-out spots see no training spot nearby, as the spots of another section do not.
    validation_buffer
        Width of the ring left out around blocked validation patches, in spot pitches
        (median distance of a spot to its nearest neighbour).
    feature_noise
        Standard deviation of Gaussian noise added to the network's input features at every
        training step (spot vectors and region/global tokens, after standardisation and
        ``n_components`` reduction), relative to each feature's spread over the stack; ``0``
        (default) adds none. Validation and prediction never see noise. On her2st patient C
        0.2 scored as none did (per-gene PCC 0.262 and 0.259 with C2 and C4 known, seeds
        0-2, against 0.263 and 0.259).
    early_stopping
        Stop when the validation loss (its exponential moving average) has not improved for
        ``patience`` epochs, and keep the best weights.
    patience
        Epochs without improvement before stopping. On her2st patient C (known C2 and
        C4, seeds 0-2) 15 scores within 0.0005 per-gene PCC of 30 with a quarter less
        fitting time: the validation loss is lowest early and rarely improves later.
    loss_weights
        λ and γ of eq. 7-9 and the PCC axis; default the paper's.
    standardize_features
        ``"section"`` (default): z-score every feature within each section, which removes the
        section-to-section shift of image embeddings (stain, scanner); ``None``: features as
        they are. Applied identically at prediction.
    target_sum
        Counts per spot after library-size normalisation (expression is
        ``log1p(counts / library size * target_sum)``).
    region_size, global_size
        Window sides (full-resolution px) of the region/global targets (eq. 10); default the
        window sizes recorded by the feature extraction, else 512 and 1024 px.
    batch_size
        Known spots per mini-batch. ``None``: full-graph training (every epoch runs the
        network on all spots, one optimiser step). An integer: each epoch cuts the training
        spots into spatially contiguous tiles of at most this many spots and takes one
        optimiser step per tile, on the tile's neighbourhood in the 3D graph only (see
        :doc:`/concepts`, "Large stacks"). ``"auto"`` (default): full-graph up to
        5,000 spots when the memory estimate fits (a measured threshold, see
        :doc:`/concepts`), else mini-batches of 2,048 spots (fewer when several
        processes share them: at least one batch each).
    propagation_hops
        Mini-batch training only: hops of the 3D graph around a tile that a step sees (its
        *core*; the subgraph adds the network's message-passing rounds around it, so the
        network's outputs on the core are those of a full-graph pass). The cross-layer
        propagation reaches a tile's spots from visible spots at most this many hops away
        (full-graph training: ``n_iterations`` hops), and the consistency term covers every
        spot of the core, the unknown sections' included, as full-graph training covers
        the whole stack. More hops: closer to full-graph training, larger steps. On her2st
        patient C (tiles of 64 spots, seeds 0-2) 3 scored 0.244 and 0.242 per-gene PCC
        with C2 and C4 known against 0.249 and 0.242 full-graph, 10 scored 0.246 and
        0.246; on a 10 x 5,000-spot stack a step with 3 hops took 2.3 times as long as
        with one sampled hop, with 10 hops 3.7 times (see :doc:`/concepts`, "Large
        stacks").
    num_neighbors
        Mini-batch training only: at most this many in-edges of every spot reached on the
        network's message-passing hops (beyond the core), drawn at random at every step
        (GraphSAGE neighbour sampling, as torch_geometric's ``NeighborLoader``), so a
        step's cost is bounded by the fan-out instead of the 3D graph's degree (a spot of a
        10-section stack has 60 or more neighbours). ``None``: the exact neighbourhood. A
        network without graph attention (the default) passes no messages, so its
        subgraphs are exact whatever this is.
    max_memory_gb
        Memory (GB) training and prediction may use; estimated before any work, and a
        setting that needs more fails at once with an error naming what to change.
        ``None``: the memory available now (host RAM, or free memory of the CUDA device).
    """

    lr: float | None = None
    weight_decay: float = 1e-4
    optimizer: Optimizer = "adamw"
    mask_fraction: float = 0.8
    validation_fraction: float = 0.2
    validation: Validation = "random"
    validation_buffer: float = 1.0
    feature_noise: float = 0.0
    early_stopping: bool = True
    patience: int = 15
    loss_weights: LossWeights = field(default_factory=LossWeights)
    standardize_features: Standardize = "section"
    target_sum: float = 1e4
    region_size: float | None = None
    global_size: float | None = None
    batch_size: BatchSize = "auto"
    propagation_hops: int = 3
    num_neighbors: int | None = 10
    max_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, Mapping):
            object.__setattr__(self, "loss_weights", LossWeights(**self.loss_weights))
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}.")
        if self.standardize_features not in ("section", None):
            raise ValueError(
                f"standardize_features must be 'section' or None, got "
                f"{self.standardize_features!r}."
            )
        _check_fraction("mask_fraction", self.mask_fraction, closed_low=False)
        _check_fraction("validation_fraction", self.validation_fraction, closed_low=True)
        if self.validation not in ("random", "blocked"):
            raise ValueError(f"validation must be 'random' or 'blocked', got {self.validation!r}.")
        if not self.validation_buffer >= 0:
            raise ValueError(f"validation_buffer must be >= 0, got {self.validation_buffer!r}.")
        if isinstance(self.feature_noise, bool) or not (
            isinstance(self.feature_noise, int | float) and 0 <= self.feature_noise < math.inf
        ):
            raise ValueError(
                f"feature_noise must be a number >= 0 (0: no noise), got {self.feature_noise!r}."
            )
        _check_bool("early_stopping", self.early_stopping)
        _check_positive_int("patience", self.patience)
        _check_positive_int("propagation_hops", self.propagation_hops)
        for name in ("lr", "region_size", "global_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not self.target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {self.target_sum!r}.")
        if self.early_stopping and self.validation_fraction == 0:
            raise ValueError(
                "early_stopping=True needs held-out spots: set validation_fraction > 0, or "
                "early_stopping=False."
            )
        if self.batch_size not in ("auto", None) and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < MIN_BATCH_SIZE
        ):
            raise ValueError(
                f"batch_size must be 'auto', None (full-graph training) or an integer >= "
                f"{MIN_BATCH_SIZE} (known spots per mini-batch), got {self.batch_size!r}."
            )
        if self.num_neighbors is not None:
            _check_positive_int("num_neighbors", self.num_neighbors)
        if self.max_memory_gb is not None and not (
            isinstance(self.max_memory_gb, int | float)
            and not isinstance(self.max_memory_gb, bool)
            and self.max_memory_gb > 0
        ):
            raise ValueError(
                f"max_memory_gb must be a positive number of GB or None (the available "
                f"memory), got {self.max_memory_gb!r}."
            )

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimiser's default when it is ``None``."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-3 if self.optimizer == "adamw" else 1e-2
