"""The training plan of ASIGN: splits, masked epochs, mini-batches, early stopping, ensembles.

Full-graph training needs no Lightning: one optimiser step per epoch over the whole stack.
Large stacks train on mini-batches instead: spatially contiguous tiles of the known spots
with their neighbourhood in the 3D graph (:mod:`asign_sc.models._sampling`), one optimiser
step per tile, optionally sharded over the processes of a ``torch.distributed`` group
(:mod:`asign_sc.models._distributed`). The split into a module
(:class:`~asign_sc.models.ASIGNNet`), a plan (this file) and a model wrapper
(:class:`~asign_sc.models.ASIGNModel`) follows scvi-tools, kept light.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from asign_sc._errors import InvalidStackError
from asign_sc._keys import LEVELS
from asign_sc.models._asign import ASIGNNet
from asign_sc.models._config import MIN_BATCH_SIZE, TrainingConfig
from asign_sc.models._data import GraphInputs
from asign_sc.models._losses import ASIGNLoss, pcc_loss
from asign_sc.models._memory import (
    FLOAT,
    MemoryEstimate,
    check_memory,
    chunked_pass_bytes,
    memory_budget,
    network_bytes,
)
from asign_sc.models._sampling import (
    GraphSampler,
    Subgraph,
    sample_layers,
    sample_neighbors,
    spatial_batches,
)

__all__ = [
    "AUTO_BATCH_SIZE",
    "FULL_GRAPH_MAX_SPOTS",
    "EnsembleFit",
    "TrainingPlan",
    "fit_ensemble",
    "resolve_batch_size",
    "split_validation",
]

logger = logging.getLogger(__name__)

VAL_SMOOTHING = 0.8
"""Weight of the past in the exponential moving average of the validation loss."""

FULL_GRAPH_MAX_SPOTS = 5_000
"""Largest stack ``batch_size="auto"`` trains full-graph. Measured with
``benchmarks/minibatch.py`` (results in ``benchmarks/results/minibatch.md``: synthetic
10-section stacks, one known section, 64-d features with 9 tokens per level, the paper's
network with ``hidden_dim=128``, 2 threads, idle machine): a full-graph epoch took 0.55 s
at 2,000 spots, 1.29 s at 5,000 and 3.67 s at 10,000 (it grows with the whole stack).
Full-graph training is the paper's protocol, so it is kept while an epoch stays around a
second; her2st patient C (910 spots) trains full-graph."""
AUTO_BATCH_SIZE = 2048
"""Known spots per mini-batch of ``batch_size="auto"``."""
VALIDATION_CHUNK_SIZE = 8192
"""Spots per chunk of the whole-stack validation pass of mini-batch training."""
WHOLE_STACK_VALIDATION_SHARE = 0.5
"""Mini-batch training validates in one exact pass over the whole stack (in chunks, as
prediction does) once the validation tiles' subgraphs together hold at least this share of
the stack's spots. Measured (plain 50,000-spot stack, ``validation="random"``, 2 threads):
the subgraphs held 100,000 spots and took 2.3-3.0 s, the whole-stack pass 1.8 s, with the
same loss. Random validation spots are spread over the known section, so their closures
cover the stack; blocked patches keep their (smaller) subgraphs."""


def resolve_batch_size(
    batch_size: int | str | None,
    *,
    n_obs: int,
    n_pool: int,
    world_size: int = 1,
    full_graph_fits: bool = True,
) -> int | None:
    """The mini-batch size training uses (``None``: full-graph).

    Parameters
    ----------
    batch_size
        ``TrainingConfig.batch_size``.
    n_obs
        Spots of the stack.
    n_pool
        Training spots (the pool the batches are cut from).
    world_size
        Processes training together; several need mini-batches to share out.
    full_graph_fits
        Whether the memory estimate of a full-graph epoch fits the budget.
    """
    if batch_size is None:
        if world_size > 1:
            raise ValueError(
                f"Training on {world_size} devices shares mini-batches between them, but "
                "TrainingConfig(batch_size=None) asks for full-graph training. Use "
                "batch_size='auto' or a number of spots per batch, or devices=1."
            )
        return None
    if batch_size == "auto":
        if world_size == 1 and n_obs <= FULL_GRAPH_MAX_SPOTS and full_graph_fits:
            return None
        # at least one batch per process
        per_process = math.ceil(n_pool / world_size)
        return max(MIN_BATCH_SIZE, min(AUTO_BATCH_SIZE, per_process))
    return int(batch_size)


def split_validation(
    n_known: int,
    fraction: float,
    early_stopping: bool,
    rng: np.random.Generator,
    *,
    coords: np.ndarray | None = None,
    buffer: float = 1.0,
    n_blocks: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the known rows) of the validation spots and of the training pool.

    Without ``coords`` the validation spots are drawn at random. With ``coords`` (one frame
    per section, sections far apart) they form ``n_blocks`` contiguous patches: each grows
    from a random spot to its nearest unassigned spots; spots within ``buffer`` pitches of a
    patch are left out of both sets.
    """
    n_val = round(fraction * n_known)
    if early_stopping and n_val == 0:
        raise ValueError(
            "early_stopping=True needs held-out spots: set validation_fraction > 0 (and enough "
            "known spots), or early_stopping=False."
        )
    if coords is None or n_val == 0:
        order = rng.permutation(n_known)
        val, pool = np.sort(order[:n_val]), np.sort(order[n_val:])
    else:
        val, pool = _blocked_split(coords, n_val, rng, buffer=buffer, n_blocks=n_blocks)
    if len(pool) < 4:
        raise InvalidStackError(
            f"Only {n_known} known spots ({len(val)} held out for validation, "
            f"{n_known - len(val) - len(pool)} in the buffer): at least 4 are needed to train. "
            "Use more known spots or a smaller validation_fraction."
        )
    return val, pool


def _blocked_split(
    coords: np.ndarray, n_val: int, rng: np.random.Generator, *, buffer: float, n_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    tree = cKDTree(coords)
    nearest, _ = tree.query(coords, k=2)
    pitch = float(np.median(nearest[:, 1])) if len(coords) > 1 else 1.0
    assigned = np.zeros(len(coords), dtype=bool)
    block = int(np.ceil(n_val / n_blocks))
    validation: list[int] = []
    while len(validation) < n_val and not assigned.all():
        centre = rng.choice(np.flatnonzero(~assigned))
        size = min(block, n_val - len(validation))
        _, order = tree.query(coords[centre], k=min(len(coords), size + int(assigned.sum())))
        members = [i for i in np.atleast_1d(order) if not assigned[i]][:size]
        assigned[members] = True
        validation.extend(int(i) for i in members)
    val = np.sort(np.asarray(validation, dtype=int))
    ring = np.zeros(len(coords), dtype=bool)
    for near in tree.query_ball_point(coords[val], r=buffer * pitch + 1e-9 * pitch):
        ring[near] = True
    ring[val] = False
    pool = np.flatnonzero(~ring & ~np.isin(np.arange(len(coords)), val))
    return val, pool


class TrainingPlan:
    """Training of one network with masked propagation, mini-batches and early stopping.

    Full-graph (``batch_size=None``): every epoch runs the network on all spots and takes one
    optimiser step. Mini-batch (``batch_size`` spots): the training pool is cut once into
    spatially contiguous tiles (:func:`~asign_sc.models._sampling.spatial_batches` of
    ``tile_coords``); every epoch visits the tiles in a random order and takes one step per
    tile on its subgraph: the tile's spots (seeds), their *core* (every spot within
    ``TrainingConfig.propagation_hops`` hops in the 3D graph, other sections included) and
    ``n_gat_layers`` more hops around it, so the network's outputs on the core are exactly
    those of a full-graph pass (with ``num_neighbors``, those outer hops keep a random share
    of each spot's in-edges; a network without graph attention has none). The cross-layer
    propagation runs inside the subgraph: labels reach a seed from visible spots at most
    ``propagation_hops`` hops away (in full-graph training, from anywhere within
    ``n_iterations`` hops); prediction propagates over the whole graph. The supervised terms
    are computed on the seeds, the consistency term on the whole core, as full-graph
    training computes it on the whole stack: on her2st patient C, leaving out the unknown
    sections' spots from it, or propagating one hop only, lost 0.01-0.03 per-gene PCC on
    the unknown sections (probes in :doc:`/concepts`, "Large stacks"). Validation runs on
    tiles of the held-out spots in the same way, their losses computed over all of them at
    once.

    With ``world_size > 1`` (a ``torch.distributed`` group), every process draws the same
    masks and tile order and takes its share of the tiles (tile ``rank``, ``rank +
    world_size``, ... padded by wrapping around so all take as many steps), and the network
    is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
    gradients of a step over the processes.

    Parameters
    ----------
    net
        The network to train (moved to ``device``).
    config
        Optimiser, masking, validation and loss settings.
    epochs
        Maximum number of epochs.
    inputs
        The stack's reduced inputs.
    rows
        Table rows of the known spots.
    spot_targets
        ``(len(rows), n_genes)`` normalised measured expression of the known spots.
    pool_targets
        Spot, region and global targets of the training pool (``rows[pool_pos]``).
    pool_pos, val_pos
        Positions into ``rows`` of the training pool and of the validation spots.
    rng
        Random generator of the masks.
    device
        Where to train.
    batch_size
        Training spots per mini-batch; ``None``: full-graph.
    tile_coords
        ``(len(rows), 2)`` positions of the known spots the tiles are cut in (needed for
        mini-batches).
    rank, world_size
        This process and the number of processes of the ``torch.distributed`` group.
    """

    def __init__(
        self,
        net: ASIGNNet,
        config: TrainingConfig,
        epochs: int,
        inputs: GraphInputs,
        rows: np.ndarray,
        spot_targets: np.ndarray,
        pool_targets: Mapping[str, np.ndarray],
        *,
        pool_pos: np.ndarray,
        val_pos: np.ndarray,
        rng: np.random.Generator,
        device: torch.device,
        batch_size: int | None = None,
        tile_coords: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n_obs = inputs.spot.shape[0]
        self.rng, self.device, self.n_obs, self.epochs = rng, device, n_obs, epochs
        self.config, self.batch_size = config, batch_size
        self.rank, self.world_size = rank, world_size
        self.net = net.to(device)
        self.inputs = inputs.to(device)
        self.loss = ASIGNLoss(config.loss_weights)
        # positions into `rows`: validation (never trained on) and training pool
        self.val_pos, self.pool_pos = val_pos, pool_pos
        self.rows = torch.as_tensor(rows, device=device)
        self.pool_rows = self.rows[torch.as_tensor(pool_pos, device=device)]
        # targets of the pool, in pool order (spot level = measured values)
        self.targets = {k: torch.as_tensor(v, device=device) for k, v in pool_targets.items()}
        values = torch.zeros(n_obs, spot_targets.shape[1], device=device)
        values[self.rows] = torch.as_tensor(spot_targets, device=device)
        self.values = values
        # validation input: a fixed share of the pool visible, as dense as in training
        n_visible = max(1, round((1 - config.mask_fraction) * len(self.pool_pos)))
        self.val_visible = self._mask(rng.choice(self.pool_pos, n_visible, replace=False))
        # validation rows in the order validate() scores them (the tiles' order with subgraphs)
        self.val_rows = self.rows[torch.as_tensor(val_pos, dtype=torch.long, device=device)]
        self.validate_whole_stack = False
        if batch_size is not None:
            self._prepare_batches(rows, tile_coords, batch_size)
        self._check_memory()
        if batch_size is not None:
            self._build_subgraphs()

        # spread of each input feature over the stack, the scale of TrainingConfig.feature_noise
        self.feature_spread = (
            (
                self.inputs.spot.std(0),
                self.inputs.region_tokens.flatten(0, 1).std(0),
                self.inputs.global_tokens.flatten(0, 1).std(0),
            )
            if config.feature_noise > 0
            else None
        )
        self.net.network.set_output_bias({level: self.targets[level].mean(0) for level in LEVELS})
        self.model: torch.nn.Module = self.net
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net)
        params = self.net.parameters()
        if config.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=config.learning_rate, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda epoch: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs)),
        )
        self.best_epoch = 0

    # -- set-up ---------------------------------------------------------------------------
    def _prepare_batches(
        self, rows: np.ndarray, tile_coords: np.ndarray | None, batch_size: int
    ) -> None:
        """Cut pool and validation spots into tiles and find their closures (node lists)."""
        if tile_coords is None:
            raise ValueError(
                "Mini-batch training needs tile_coords (positions of the known spots)."
            )
        # the closure: the propagation's hops around a tile, then the network's message-passing
        # rounds (so its outputs on the core, the spots within the propagation's hops, are
        # exact); the core is what the propagation and the consistency term of a step see
        rounds, hops = self.net.message_passing_rounds, self.config.propagation_hops
        self.sampler = GraphSampler(self.inputs, n_hops=hops + rounds, core_hops=hops)
        # sampled in-edges only on the message-passing hops; none without graph attention
        fanout = self.config.num_neighbors
        self.fanouts = None if fanout is None or rounds == 0 else [None] * hops + [fanout] * rounds
        # seeds: positions into the pool (for the targets) and their table rows
        self.train_tiles = spatial_batches(tile_coords[self.pool_pos], batch_size)
        val_tiles = (
            spatial_batches(tile_coords[self.val_pos], batch_size) if len(self.val_pos) else []
        )
        self.val_tiles = val_tiles
        self.seed_rows = {
            "train": [rows[self.pool_pos[t]] for t in self.train_tiles],
            "val": [rows[self.val_pos[t]] for t in val_tiles],
        }
        if self.fanouts is None:
            layers = {
                group: [self.sampler.closure_layers(seeds) for seeds in seed_rows]
                for group, seed_rows in self.seed_rows.items()
            }
            self.closures = {
                group: [np.concatenate(tile) for tile in tiles] for group, tiles in layers.items()
            }
            self.core_sizes = {
                group: [self.sampler.core_size(tile) for tile in tiles]
                for group, tiles in layers.items()
            }
        else:
            # training tiles are sampled afresh at every step; the validation tiles once, so
            # early stopping compares epochs on the same subgraphs. A child generator (spawning
            # leaves self.rng's state as it is): the masks are those of exact training, and
            # the same on every process of a distributed group, whatever each one samples.
            self.sampling_rng = self.rng.spawn(1)[0]
            val_draws = [
                sample_layers(
                    self.sampler.attention,
                    seeds,
                    self.sampler.n_hops,
                    self.fanouts,
                    np.random.default_rng(i),
                )
                for i, seeds in enumerate(self.seed_rows["val"])
            ]
            # one draw of every training tile (its nodes and edge count), for the memory
            # estimate and the log
            draws = [
                sample_neighbors(
                    self.sampler.attention,
                    seeds,
                    self.sampler.n_hops,
                    self.fanouts,
                    self.sampling_rng,
                )
                for seeds in self.seed_rows["train"]
            ]
            self.sampled_sizes = [(len(nodes), len(edges)) for nodes, edges in draws]
            self.closures = {
                "train": [nodes for nodes, _ in draws],
                "val": [np.concatenate(layers) for layers, _ in val_draws],
            }
        n_val_nodes = sum(len(nodes) for nodes in self.closures["val"])
        self.validate_whole_stack = n_val_nodes >= WHOLE_STACK_VALIDATION_SHARE * self.n_obs
        if self.validate_whole_stack:
            logger.info(
                "Validation: one pass over the whole stack in chunks of %d spots (its tiles' "
                "subgraphs would hold %d spots).",
                VALIDATION_CHUNK_SIZE,
                n_val_nodes,
            )
            self.val_tiles, self.closures["val"], self.val_subgraphs = [], [], []
            self.seed_rows["val"] = []
            if self.fanouts is None:
                self.core_sizes["val"] = []
        else:
            if self.fanouts is not None:  # drawn once, built only now that they are used
                self.val_subgraphs = [
                    self.sampler.from_draw(seeds, layers, edges)
                    for seeds, (layers, edges) in zip(self.seed_rows["val"], val_draws, strict=True)
                ]
            # validation order: the tiles' seeds concatenated
            if val_tiles:
                self.val_rows = torch.as_tensor(
                    np.concatenate(self.seed_rows["val"]), device=self.device
                )
        sizes = [len(nodes) for nodes in self.closures["train"]]
        logger.info(
            "Mini-batch training: %d tiles of <= %d training spots, subgraphs of %d-%d spots "
            "(%d-hop closures%s) in a stack of %d.",
            len(self.train_tiles),
            batch_size,
            min(sizes),
            max(sizes),
            self.sampler.n_hops,
            ""
            if self.fanouts is None
            else f", at most {self.config.num_neighbors} sampled in-edges per spot beyond "
            f"{self.sampler.core_hops} hops",
            self.n_obs,
        )

    def _build_subgraphs(self) -> None:
        """The exact closures' subgraphs (they list their seeds first), built once."""
        if self.fanouts is not None:
            return  # training steps sample afresh; the validation tiles are drawn already
        self.train_subgraphs, self.val_subgraphs = (
            [
                self.sampler.induced(nodes, n_seeds=len(tile), n_core=core)
                for nodes, tile, core in zip(
                    self.closures[group], tiles, self.core_sizes[group], strict=True
                )
            ]
            for group, tiles in (("train", self.train_tiles), ("val", self.val_tiles))
        )

    def memory_estimate(self) -> MemoryEstimate:
        """Estimated memory of one training step (full graph or the largest subgraph)."""
        inputs = self.inputs
        width = inputs.spot.shape[1] + sum(
            t.shape[1] * t.shape[2] for t in (inputs.region_tokens, inputs.global_tokens)
        )
        held = self.n_obs  # rows of features held: the stack, plus the subgraphs' copies
        if self.batch_size is None:
            n_nodes, n_edges = self.n_obs, int(inputs.edge_index.shape[1])
        elif self.fanouts is None:
            largest = max(self.closures["train"], key=len)
            n_nodes, n_edges = len(largest), self.sampler.n_edges(largest)
            held += sum(len(nodes) for group in self.closures.values() for nodes in group)
        else:
            # a step's subgraph is sampled afresh: the largest draw, with a margin for others
            n_nodes, n_edges = (round(1.1 * size) for size in max(self.sampled_sizes))
            held += n_nodes + sum(len(nodes) for nodes in self.closures["val"])
        step = training_step_bytes(self.net, inputs, n_nodes, n_edges)
        if self.validate_whole_stack:
            # the step's tensors are freed before validation: the larger of the two counts
            validation = whole_stack_pass_bytes(self.net, inputs, VALIDATION_CHUNK_SIZE)
            step = max(step, validation, key=lambda estimate: estimate.total)
        return step + MemoryEstimate({"inputs": float(held) * width * FLOAT})

    def _check_memory(self) -> None:
        budget = memory_budget(self.config.max_memory_gb, self.device)
        what = (
            f"Full-graph training on {self.n_obs} spots"
            if self.batch_size is None
            else f"Mini-batch training (batch_size={self.batch_size})"
        )
        check_memory(self.memory_estimate(), budget, what=what)

    def _mask(self, positions: np.ndarray) -> torch.Tensor:
        mask = torch.zeros(self.n_obs, dtype=torch.bool, device=self.device)
        mask[self.rows[torch.as_tensor(positions, device=self.device)]] = True
        return mask

    def _spot_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.config.loss_weights
        return torch.nn.functional.mse_loss(pred, target) + weights.lambda_s * pcc_loss(
            pred, target, axis=weights.pcc_axis
        )

    # -- one epoch ------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One epoch: hide a random part of the pool, supervise it and the network heads."""
        self.net.train()
        n_hidden = max(1, round(self.config.mask_fraction * len(self.pool_pos)))
        hidden_pos = self.rng.choice(self.pool_pos, n_hidden, replace=False)
        visible = self._mask(np.setdiff1d(self.pool_pos, hidden_pos))
        if self.batch_size is not None:
            return self._batch_epoch(visible)
        out = self.model(*self._training_args(self.inputs), self.values, visible)
        net_loss, parts = self.loss(
            {level: out[level][self.pool_rows] for level in LEVELS},
            self.targets,
            consistency_pred={level: out[level] for level in LEVELS},
        )
        hidden_rows = self.rows[torch.as_tensor(hidden_pos, device=self.device)]
        blend_loss = self._spot_loss(out["prediction"][hidden_rows], self.values[hidden_rows])
        record = self._optimise(net_loss, blend_loss, parts)
        self.scheduler.step()
        return record

    def _training_args(self, inputs: GraphInputs) -> tuple[torch.Tensor, ...]:
        """The network's inputs for a training step, features noised by ``feature_noise``."""
        args = inputs.args()
        if self.feature_spread is None:
            return args
        noise = self.config.feature_noise
        noisy = tuple(
            x + noise * spread * torch.randn_like(x)
            for x, spread in zip(args[:3], self.feature_spread, strict=True)
        )
        return noisy + args[3:]

    def _optimise(
        self, net_loss: torch.Tensor, blend_loss: torch.Tensor, parts: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        loss = net_loss + blend_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.optimizer.step()
        return {
            "loss": float(loss.detach()),
            "network_loss": float(net_loss.detach()),
            "blend_loss": float(blend_loss.detach()),
            "mse": float(parts["mse"]),
            "pcc_spot": float(parts["pcc_spot"]),
        }

    def _batch_epoch(self, visible: torch.Tensor) -> dict[str, float]:
        """One step per tile (this process's share of them), in a random order."""
        visible_pool = visible[self.pool_rows]
        order = self.rng.permutation(len(self.train_tiles))
        n_steps = math.ceil(len(order) / self.world_size)
        records = []
        for step in range(n_steps):
            tile = int(order[(step * self.world_size + self.rank) % len(order)])
            subgraph = (
                self.train_subgraphs[tile]
                if self.fanouts is None
                else self.sampler.sampled(
                    self.seed_rows["train"][tile], self.fanouts, self.sampling_rng
                )
            )
            seeds_in_pool = torch.as_tensor(self.train_tiles[tile], device=self.device)
            records.append(self._batch_step(subgraph, seeds_in_pool, visible, visible_pool))
        self.scheduler.step()
        mean = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
        if self.world_size > 1:
            import torch.distributed as dist

            keys = sorted(mean)
            # on the training device: NCCL reduces CUDA tensors only
            summed = torch.tensor([mean[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(summed)
            mean = {k: float(v) / self.world_size for k, v in zip(keys, summed, strict=True)}
        return mean

    def _batch_step(
        self,
        subgraph: Subgraph,
        seeds_in_pool: torch.Tensor,
        visible: torch.Tensor,
        visible_pool: torch.Tensor,
    ) -> dict[str, float]:
        nodes = torch.as_tensor(subgraph.nodes, device=self.device)
        n_seeds = subgraph.n_seeds
        values = self.values[nodes]
        out = self.model(*self._training_args(subgraph.inputs), values, visible[nodes])
        net_loss, parts = self.loss(
            {level: out[level][:n_seeds] for level in LEVELS},
            {level: target[seeds_in_pool] for level, target in self.targets.items()},
            # unsupervised: like full-graph training's over every spot of the stack, it covers
            # every spot of the core, unknown sections included
            consistency_pred={level: out[level][: subgraph.n_core] for level in LEVELS},
        )
        hidden = torch.nonzero(~visible_pool[seeds_in_pool]).squeeze(1)
        if len(hidden) >= 2:
            blend_loss = self._spot_loss(out["prediction"][hidden], values[hidden])
        else:
            # keeps every parameter in the graph (DistributedDataParallel needs that)
            blend_loss = 0.0 * out["prediction"].sum()
        return self._optimise(net_loss, blend_loss, parts)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the blended and network predictions on the validation spots."""
        self.net.eval()
        if self.batch_size is None or self.validate_whole_stack:
            chunk_size = None if self.batch_size is None else VALIDATION_CHUNK_SIZE
            out = self.net(
                *self.inputs.args(), self.values, self.val_visible, chunk_size=chunk_size
            )
            rows = self.val_rows
            prediction, network = out["prediction"][rows], out["spot"][rows]
        else:
            predictions, networks = [], []
            for subgraph in self.val_subgraphs:
                nodes = torch.as_tensor(subgraph.nodes, device=self.device)
                out = self.net(*subgraph.inputs.args(), self.values[nodes], self.val_visible[nodes])
                predictions.append(out["prediction"][: subgraph.n_seeds])
                networks.append(out["spot"][: subgraph.n_seeds])
            rows, prediction, network = self.val_rows, torch.cat(predictions), torch.cat(networks)
        target = self.values[rows]
        metrics = {
            "val_loss": float(self._spot_loss(prediction, target)),
            "val_pcc": 1.0 - float(pcc_loss(prediction, target)),
            "val_network_pcc": 1.0 - float(pcc_loss(network, target)),
        }
        if self.world_size > 1:
            # every process decides early stopping on rank 0's numbers
            import torch.distributed as dist

            keys = sorted(metrics)
            shared = torch.tensor(
                [metrics[k] for k in keys], dtype=torch.float64, device=self.device
            )
            dist.broadcast(shared, 0)
            metrics = {k: float(v) for k, v in zip(keys, shared, strict=True)}
        return metrics

    def run(self, *, show_progress_bar: bool, desc: str = "ASIGN") -> pd.DataFrame:
        """Train until ``epochs`` or early stopping; returns the history, one row per epoch."""
        records: list[dict[str, float]] = []
        best, best_state, stale = math.inf, None, 0
        early_stopping = self.config.early_stopping
        show = show_progress_bar and self.rank == 0
        bar = tqdm(range(self.epochs), desc=desc, disable=not show, leave=False)
        for epoch in bar:
            start = time.perf_counter()
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], **self.step()}
            if len(self.val_pos):
                record.update(self.validate())
                # a few dozen held-out spots give a noisy loss: stop on its moving average
                smoothed = records[-1]["val_loss_smoothed"] if records else record["val_loss"]
                record["val_loss_smoothed"] = (
                    VAL_SMOOTHING * smoothed + (1 - VAL_SMOOTHING) * record["val_loss"]
                )
            record["seconds"] = time.perf_counter() - start
            records.append(record)
            if not all(math.isfinite(v) for v in record.values()):
                raise FloatingPointError(
                    f"Training diverged at epoch {epoch} ({record}). Lower the learning rate "
                    "(TrainingConfig(lr=...)) or use optimizer='adamw'."
                )
            bar.set_postfix(
                {k: f"{record[k]:.3f}" for k in ("loss", "val_loss", "val_pcc") if k in record}
            )
            if len(self.val_pos):
                if record["val_loss_smoothed"] < best - 1e-4:
                    best, stale, self.best_epoch = record["val_loss_smoothed"], 0, epoch
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    stale += 1
                if early_stopping and stale >= self.config.patience:
                    logger.info("Early stopping at epoch %d (best %d).", epoch, self.best_epoch)
                    break
            else:
                self.best_epoch = epoch
        bar.close()
        if early_stopping and best_state is not None:
            self.net.load_state_dict(best_state)
        return pd.DataFrame.from_records(records)


def full_graph_fits(
    net: ASIGNNet, config: TrainingConfig, inputs: GraphInputs, device: torch.device
) -> bool:
    """Whether a full-graph training step's memory estimate fits the budget."""
    estimate = training_step_bytes(
        net, inputs, inputs.spot.shape[0], int(inputs.edge_index.shape[1])
    )
    return estimate.total <= memory_budget(config.max_memory_gb, device)


def training_step_bytes(
    net: ASIGNNet, inputs: GraphInputs, n_nodes: int, n_edges: int
) -> MemoryEstimate:
    """Memory of one training step of ``net`` on ``n_nodes`` spots and ``n_edges`` edges."""
    return network_bytes(n_nodes, n_edges, training=True, **_sizes(net, inputs))


def _sizes(net: ASIGNNet, inputs: GraphInputs) -> dict:
    """The sizes :func:`~asign_sc.models._memory.network_bytes` reads, of ``net`` on ``inputs``."""
    n_tokens = {
        k: int(t.shape[1])
        for k, t in (("region", inputs.region_tokens), ("global", inputs.global_tokens))
    }
    return {"dims": inputs.dims, "n_tokens": n_tokens, **net.sizes}


def whole_stack_pass_bytes(net: ASIGNNet, inputs: GraphInputs, chunk_size: int) -> MemoryEstimate:
    """Memory of an exact evaluation pass of ``net`` over the stack in chunks of spots."""
    n_obs, n_edges = inputs.spot.shape[0], int(inputs.edge_index.shape[1])
    return chunked_pass_bytes(n_obs, n_edges, chunk_size, **_sizes(net, inputs))


@dataclass
class EnsembleFit:
    """What :func:`fit_ensemble` learned besides the weights."""

    history: pd.DataFrame
    """One row per member and epoch (column ``member``)."""
    best_epochs: list[int]
    """Epoch whose weights each member kept."""
    validation_positions: list[np.ndarray]
    """Positions (into the known rows) each member held out."""


def fit_ensemble(
    members: torch.nn.ModuleList,
    config: TrainingConfig,
    *,
    epochs: int,
    inputs: GraphInputs,
    rows: np.ndarray,
    spot_targets: np.ndarray,
    pool_targets: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    seed: int,
    device: torch.device,
    coords: np.ndarray | None = None,
    tile_coords: np.ndarray | None = None,
    show_progress_bar: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> EnsembleFit:
    """Train every member of an ensemble with its own seed, held-out spots and masks.

    Parameters
    ----------
    members
        The networks (their shared feature reduction already fitted; ``inputs`` reduced).
    config
        The training settings.
    epochs
        Maximum epochs per member.
    inputs
        The stack's reduced inputs.
    rows
        Table rows of the known spots.
    spot_targets
        Normalised measured expression of ``rows``.
    pool_targets
        ``pool_targets(pool_rows) -> {"spot", "region", "global"}`` targets of a training
        pool (window targets sum the pool's counts only, so held-out spots never enter).
    seed
        Member ``k`` uses ``seed + k`` for its initialisation, split and masks.
    device
        Where to train.
    coords
        ``(len(rows), 2)`` spot centres of the known spots, each section in its own region of
        the plane; needed for ``config.validation="blocked"``.
    tile_coords
        ``(len(rows), 2)`` positions the mini-batch tiles are cut in (aligned xy, so a tile
        is a column through the known sections); default ``coords``.
    show_progress_bar
        Show a progress bar per member (on rank 0).
    rank, world_size
        This process and the size of its ``torch.distributed`` group (the group must be
        initialised when ``world_size > 1``).

    Returns
    -------
    The histories, best epochs and held-out spots of the members.
    """
    splits = split_members(
        len(members), config, rows=rows, pool_targets=pool_targets, seed=seed, coords=coords
    )
    return train_members(
        members,
        splits,
        config,
        epochs=epochs,
        inputs=inputs,
        rows=rows,
        spot_targets=spot_targets,
        seed=seed,
        device=device,
        tile_coords=tile_coords if tile_coords is not None else coords,
        show_progress_bar=show_progress_bar,
        rank=rank,
        world_size=world_size,
    )


@dataclass
class MemberSplit:
    """One member's held-out and training spots, their targets, and its random generator."""

    rng: np.random.Generator
    """Generator of the member's masks (already used for the split)."""
    val_pos: np.ndarray
    """Positions (into the known rows) of the validation spots."""
    pool_pos: np.ndarray
    """Positions of the training pool."""
    pool_targets: dict[str, np.ndarray]
    """Spot, region and global targets of the pool."""


def split_members(
    n_models: int,
    config: TrainingConfig,
    *,
    rows: np.ndarray,
    pool_targets: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    seed: int,
    coords: np.ndarray | None = None,
) -> list[MemberSplit]:
    """Draw every member's validation split (member ``k`` with seed ``seed + k``).

    The splits and targets are plain arrays, so they can be sent to the processes of a
    distributed fit; see :func:`fit_ensemble` for the parameters.
    """
    splits = []
    for k in range(n_models):
        rng = np.random.default_rng(seed + k)
        val_pos, pool_pos = split_validation(
            len(rows),
            config.validation_fraction,
            config.early_stopping,
            rng,
            coords=coords if config.validation == "blocked" else None,
            buffer=config.validation_buffer,
        )
        targets = {k: np.asarray(v) for k, v in pool_targets(rows[pool_pos]).items()}
        splits.append(MemberSplit(rng, val_pos, pool_pos, targets))
    return splits


def train_members(
    members: torch.nn.ModuleList,
    splits: list[MemberSplit],
    config: TrainingConfig,
    *,
    epochs: int,
    inputs: GraphInputs,
    rows: np.ndarray,
    spot_targets: np.ndarray,
    seed: int,
    device: torch.device,
    tile_coords: np.ndarray | None = None,
    show_progress_bar: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> EnsembleFit:
    """Train every member on its split (see :func:`fit_ensemble` for the parameters)."""
    histories, best_epochs, validation = [], [], []
    n_models = len(members)
    for k, (member, split) in enumerate(zip(members, splits, strict=True)):
        torch.manual_seed(seed + k)
        batch_size = resolve_batch_size(
            config.batch_size,
            n_obs=inputs.spot.shape[0],
            n_pool=len(split.pool_pos),
            world_size=world_size,
            full_graph_fits=full_graph_fits(member, config, inputs, device),
        )
        plan = TrainingPlan(
            member,
            config,
            epochs,
            inputs,
            rows,
            spot_targets,
            split.pool_targets,
            pool_pos=split.pool_pos,
            val_pos=split.val_pos,
            rng=split.rng,
            device=device,
            batch_size=batch_size,
            tile_coords=tile_coords,
            rank=rank,
            world_size=world_size,
        )
        history = plan.run(
            show_progress_bar=show_progress_bar,
            desc=f"ASIGN {k + 1}/{n_models}" if n_models > 1 else "ASIGN",
        )
        history.insert(0, "member", k)
        histories.append(history)
        best_epochs.append(plan.best_epoch)
        validation.append(split.val_pos)
    return EnsembleFit(pd.concat(histories, ignore_index=True), best_epochs, validation)
