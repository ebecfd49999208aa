"""Training on several processes with ``torch.distributed`` (DistributedDataParallel).

:func:`fit_members` trains an ensemble's members on ``devices`` processes. It either

- spawns them itself (:func:`torch.multiprocessing.spawn`; ``gloo`` on CPU, ``nccl`` with
  one CUDA device per process), each rank training on its share of the mini-batches with
  gradients averaged by :class:`~torch.nn.parallel.DistributedDataParallel`; rank 0 writes
  the trained weights to a private temporary folder, read back by the calling process once
  every rank has finished; or
- joins the process group of a launcher (``torchrun``: ``RANK``/``WORLD_SIZE`` in the
  environment), every process calling :func:`fit_members` itself; all ranks end with the
  same weights.

A worker that fails or dies makes the call raise :class:`DistributedTrainingError`; nothing
is written to the stack (the caller records the fit only after training) and the temporary
folder is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asign_sc.models._config import TrainingConfig
from asign_sc.models._data import GraphInputs
from asign_sc.models._training import (
    EnsembleFit,
    MemberSplit,
    fit_ensemble,
    split_members,
    train_members,
)

__all__ = ["DistributedTrainingError", "fit_members", "launched_by_torchrun"]

logger = logging.getLogger(__name__)

RESULT_FILE = "result.pt"
FAULT_ENV = "ASIGN_SC_TEST_FAULT_RANK"
"""Test hook: the rank named here exits abruptly (``os._exit(3)``) after building its plan,
as a killed worker would; used by the tests of the failure path only."""


class DistributedTrainingError(RuntimeError):
    """A process of a distributed fit failed or died; nothing was written."""


def launched_by_torchrun() -> bool:
    """Whether this process belongs to a launcher's group (``WORLD_SIZE`` > 1 set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def check_devices(devices: Any, device: torch.device) -> int:
    """``devices`` as a positive int, checked against the launcher and the CUDA devices."""
    if isinstance(devices, bool) or not isinstance(devices, int | np.integer) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}.")
    devices = int(devices)
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if devices not in (1, world):
            raise ValueError(
                f"This process was started by a launcher with WORLD_SIZE={world}; pass "
                f"devices={world} (or leave devices=1) and let the launcher start the processes."
            )
        return world
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(
            f"devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible."
        )
    return devices


@dataclass
class _Job:
    """Everything a spawned process needs (pickled once per process)."""

    members: torch.nn.ModuleList
    splits: list[MemberSplit]
    config: TrainingConfig
    kwargs: dict[str, Any]
    device_type: str
    world_size: int
    folder: str
    threads: int


def fit_members(
    members: torch.nn.ModuleList,
    config: TrainingConfig,
    *,
    devices: int,
    epochs: int,
    inputs: GraphInputs,
    rows: np.ndarray,
    spot_targets: np.ndarray,
    pool_targets: Any,
    seed: int,
    device: torch.device,
    coords: np.ndarray | None = None,
    tile_coords: np.ndarray | None = None,
    show_progress_bar: bool = True,
) -> EnsembleFit:
    """Train the members on ``devices`` processes (see the module docstring).

    Parameters are those of :func:`~asign_sc.models._training.fit_ensemble`, plus
    ``devices``: processes to train on (1: in this process, unchanged).

    Returns
    -------
    The fit; ``members`` hold the trained weights.
    """
    world_size = check_devices(devices, device)
    kwargs = {
        "epochs": epochs,
        "inputs": inputs,
        "rows": rows,
        "spot_targets": spot_targets,
        "seed": seed,
        "tile_coords": tile_coords if tile_coords is not None else coords,
        "show_progress_bar": show_progress_bar,
    }
    if world_size > 1 and config.batch_size is None:
        raise ValueError(
            f"devices={world_size} shares mini-batches between processes, but "
            "TrainingConfig(batch_size=None) asks for full-graph training. Use "
            "batch_size='auto' or a number of spots per batch, or devices=1."
        )
    if world_size == 1:
        return fit_ensemble(
            members, config, pool_targets=pool_targets, coords=coords, device=device, **kwargs
        )
    splits = split_members(
        len(members), config, rows=rows, pool_targets=pool_targets, seed=seed, coords=coords
    )
    if launched_by_torchrun():
        return _join_group(members, splits, config, device, kwargs)
    return _spawn(members, splits, config, device, world_size, kwargs)


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _join_group(
    members: torch.nn.ModuleList,
    splits: list[MemberSplit],
    config: TrainingConfig,
    device: torch.device,
    kwargs: dict[str, Any],
) -> EnsembleFit:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(_backend(device.type))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    logger.info("Joined a process group of %d (rank %d, %s).", world_size, rank, device)
    fit = train_members(
        members, splits, config, device=device, rank=rank, world_size=world_size, **kwargs
    )
    dist.barrier()
    return fit


def _spawn(
    members: torch.nn.ModuleList,
    splits: list[MemberSplit],
    config: TrainingConfig,
    device: torch.device,
    world_size: int,
    kwargs: dict[str, Any],
) -> EnsembleFit:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    folder = tempfile.mkdtemp(prefix="asign_sc_ddp_")
    threads = max(1, torch.get_num_threads() // world_size) if device.type == "cpu" else 1
    job = _Job(members.cpu(), splits, config, kwargs, device.type, world_size, folder, threads)
    logger.info(
        "Training on %d processes (%s, %s).", world_size, _backend(device.type), device.type
    )
    try:
        try:
            mp.spawn(_worker, args=(job,), nprocs=world_size, join=True)
        except ProcessException as error:
            raise DistributedTrainingError(
                f"Distributed training failed: process {error.error_index} of {world_size} "
                f"{_what_happened(error)}. Nothing was written; the stack is unchanged. Rerun, "
                "or train in one process with devices=1."
            ) from error
        result_file = Path(folder) / RESULT_FILE
        if not result_file.is_file():
            raise DistributedTrainingError(
                "Distributed training ended without a result from rank 0; nothing was written."
            )
        result = torch.load(result_file, map_location="cpu", weights_only=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for member, state in zip(members, result["states"], strict=True):
        member.load_state_dict(state)
    members.to(device)
    return result["fit"]


def _what_happened(error: Exception) -> str:
    from torch.multiprocessing.spawn import ProcessExitedException

    if isinstance(error, ProcessExitedException):
        if error.signal_name:
            return f"was killed by {error.signal_name}"
        return f"exited with code {error.exit_code}"
    first_line = str(error).strip().splitlines()
    return "raised an error: " + (first_line[-1] if first_line else type(error).__name__)


def _worker(rank: int, job: _Job) -> None:
    """One spawned process: join the group, train its share, rank 0 writes the result."""
    import torch.distributed as dist

    torch.set_num_threads(job.threads)
    dist.init_process_group(
        _backend(job.device_type),
        init_method=f"file://{job.folder}/rendezvous",
        rank=rank,
        world_size=job.world_size,
    )
    try:
        device = torch.device(job.device_type, rank) if job.device_type == "cuda" else None
        if device is not None:
            torch.cuda.set_device(device)
        kwargs = dict(job.kwargs)
        kwargs["show_progress_bar"] = kwargs["show_progress_bar"] and rank == 0
        if os.environ.get(FAULT_ENV) == str(rank):
            os._exit(3)
        fit = train_members(
            job.members,
            job.splits,
            job.config,
            device=device or torch.device("cpu"),
            rank=rank,
            world_size=job.world_size,
            **kwargs,
        )
        if rank == 0:
            states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in job.members]
            partial = Path(job.folder) / f".{RESULT_FILE}.partial"
            torch.save({"states": states, "fit": fit}, partial)
            partial.rename(Path(job.folder) / RESULT_FILE)
        dist.barrier()
    finally:
        dist.destroy_process_group()
