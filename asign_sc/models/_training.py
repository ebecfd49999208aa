"""The training plan of ASIGN: splits, masked full-graph epochs, early stopping, ensembles.

Full-graph training needs no Lightning: one optimiser step per epoch over the whole stack.
The split into a module (:class:`~asign_sc.models.ASIGNNet`), a plan (this file) and a
model wrapper (:class:`~asign_sc.models.ASIGNModel`) follows scvi-tools, kept light.
"""

from __future__ import annotations

import copy
import logging
import math
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
from asign_sc.models._config import TrainingConfig
from asign_sc.models._data import GraphInputs
from asign_sc.models._losses import ASIGNLoss, pcc_loss

__all__ = ["EnsembleFit", "TrainingPlan", "fit_ensemble", "split_validation"]

logger = logging.getLogger(__name__)

VAL_SMOOTHING = 0.8
"""Weight of the past in the exponential moving average of the validation loss."""


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
    """Full-graph training of one network with masked propagation and early stopping.

    Parameters
    ----------
    net
        The network to train (moved to ``device``).
    config
        Optimiser, masking, validation and loss settings.
    epochs
        Maximum number of epochs (one optimiser step each).
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
    ) -> None:
        n_obs = inputs.spot.shape[0]
        self.rng, self.device, self.n_obs, self.epochs = rng, device, n_obs, epochs
        self.config = config
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

        self.net.network.set_output_bias({level: self.targets[level].mean(0) for level in LEVELS})
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

    def _mask(self, positions: np.ndarray) -> torch.Tensor:
        mask = torch.zeros(self.n_obs, dtype=torch.bool, device=self.device)
        mask[self.rows[torch.as_tensor(positions, device=self.device)]] = True
        return mask

    def _spot_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.config.loss_weights
        return torch.nn.functional.mse_loss(pred, target) + weights.lambda_s * pcc_loss(
            pred, target, axis=weights.pcc_axis
        )

    def step(self) -> dict[str, float]:
        """One epoch: hide a random part of the pool, supervise it and the network heads."""
        self.net.train()
        n_hidden = max(1, round(self.config.mask_fraction * len(self.pool_pos)))
        hidden_pos = self.rng.choice(self.pool_pos, n_hidden, replace=False)
        visible = self._mask(np.setdiff1d(self.pool_pos, hidden_pos))
        out = self.net(*self.inputs.args(), self.values, visible)
        net_loss, parts = self.loss(
            {level: out[level][self.pool_rows] for level in LEVELS},
            self.targets,
            consistency_pred={level: out[level] for level in LEVELS},
        )
        hidden_rows = self.rows[torch.as_tensor(hidden_pos, device=self.device)]
        blend_loss = self._spot_loss(out["prediction"][hidden_rows], self.values[hidden_rows])
        loss = net_loss + blend_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.optimizer.step()
        self.scheduler.step()
        return {
            "loss": float(loss.detach()),
            "network_loss": float(net_loss.detach()),
            "blend_loss": float(blend_loss.detach()),
            "mse": float(parts["mse"]),
            "pcc_spot": float(parts["pcc_spot"]),
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the blended and network predictions on the validation spots."""
        self.net.eval()
        out = self.net(*self.inputs.args(), self.values, self.val_visible)
        rows = self.rows[torch.as_tensor(self.val_pos, device=self.device)]
        target = self.values[rows]
        return {
            "val_loss": float(self._spot_loss(out["prediction"][rows], target)),
            "val_pcc": 1.0 - float(pcc_loss(out["prediction"][rows], target)),
            "val_network_pcc": 1.0 - float(pcc_loss(out["spot"][rows], target)),
        }

    def run(self, *, show_progress_bar: bool, desc: str = "ASIGN") -> pd.DataFrame:
        """Train until ``epochs`` or early stopping; returns the history, one row per epoch."""
        records: list[dict[str, float]] = []
        best, best_state, stale = math.inf, None, 0
        early_stopping = self.config.early_stopping
        bar = tqdm(range(self.epochs), desc=desc, disable=not show_progress_bar, leave=False)
        for epoch in bar:
            record = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], **self.step()}
            if len(self.val_pos):
                record.update(self.validate())
                # a few dozen held-out spots give a noisy loss: stop on its moving average
                smoothed = records[-1]["val_loss_smoothed"] if records else record["val_loss"]
                record["val_loss_smoothed"] = (
                    VAL_SMOOTHING * smoothed + (1 - VAL_SMOOTHING) * record["val_loss"]
                )
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
    show_progress_bar: bool = True,
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
    show_progress_bar
        Show a progress bar per member.

    Returns
    -------
    The histories, best epochs and held-out spots of the members.
    """
    histories, best_epochs, validation = [], [], []
    n_models = len(members)
    for k, member in enumerate(members):
        member_seed = seed + k
        rng = np.random.default_rng(member_seed)
        torch.manual_seed(member_seed)
        val_pos, pool_pos = split_validation(
            len(rows),
            config.validation_fraction,
            config.early_stopping,
            rng,
            coords=coords if config.validation == "blocked" else None,
            buffer=config.validation_buffer,
        )
        plan = TrainingPlan(
            member,
            config,
            epochs,
            inputs,
            rows,
            spot_targets,
            pool_targets(rows[pool_pos]),
            pool_pos=pool_pos,
            val_pos=val_pos,
            rng=rng,
            device=device,
        )
        history = plan.run(
            show_progress_bar=show_progress_bar,
            desc=f"ASIGN {k + 1}/{n_models}" if n_models > 1 else "ASIGN",
        )
        history.insert(0, "member", k)
        histories.append(history)
        best_epochs.append(plan.best_epoch)
        validation.append(val_pos)
    return EnsembleFit(pd.concat(histories, ignore_index=True), best_epochs, validation)
