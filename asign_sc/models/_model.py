"""``ASIGNModel``: a fitted network plus everything needed to apply it again, saved as a folder."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from asign_sc._utils import resolve_device
from asign_sc.models._asign import ASIGNEnsemble
from asign_sc.models._config import ArchitectureConfig, TrainingConfig
from asign_sc.models._data import GraphInputs
from asign_sc.models._losses import LossWeights
from asign_sc.models._memory import (
    FLOAT,
    MemoryEstimate,
    check_memory,
    chunked_pass_bytes,
    memory_budget,
)

__all__ = ["ASIGNModel"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "asign_sc.ASIGNModel"
CHECKPOINT_VERSION = 2
"""1: one ``torch.save`` file (settings, history, state dict); 2: a folder (this format)."""
WEIGHTS_FILE = "weights.pt"
SETTINGS_FILE = "settings.json"
HISTORY_FILE = "history.csv"
FEATURE_DIMS = ("spot_dim", "region_dim", "global_dim")
PREDICT_CHUNK_SIZE = 8192
"""Spots per chunk of the network at prediction (an exact, bounded-memory pass)."""
_RUN_KEYS = ("epochs", "seed", "best_epoch", "validation_obs", "seconds")
"""Entries of ``settings["training"]`` that describe the run, not the configuration."""


#: ArchitectureConfig fields used at prediction only, not by the networks.
PREDICTION_ONLY = ("ridge_member",)


class ASIGNModel:
    """A fitted ASIGN model: the network plus everything needed to apply it to a stack.

    Returned by :func:`asign_sc.tl.fit_asign` and consumed by :func:`asign_sc.tl.impute`;
    :meth:`save` writes a folder (weights, readable ``settings.json``, ``history.csv``) that
    :meth:`load` reads back.

    Parameters
    ----------
    net
        The network(s): an ensemble of :class:`~asign_sc.models.ASIGNNet`.
    architecture
        The network's architecture.
    training
        How it was trained; its data choices (feature standardisation, ``target_sum``) are
        repeated at prediction.
    genes
        Modelled genes, in output order.
    feature_dims
        ``{"spot_dim", "region_dim", "global_dim"}``: embedding sizes the network reads.
    features_key, graph_key
        ``key_added`` of the features and of the 3D graph the model was fitted on.
    counts_layer
        Layer of raw counts the model was fitted on (``None``: ``X``).
    library_key
        ``obs`` column naming sections.
    known_sections
        Sections the model was trained on.
    sample_key, samples
        For a cohort fit: the ``obs`` column of samples and ``{sample: known sections}``
        (``None`` for one stack).
    windows_px
        Region/global target windows (px), per level (a number or ``{section: px}``).
    run
        What the fit recorded: ``epochs``, ``seed``, ``best_epoch`` (per member),
        ``validation_obs`` (held-out spot names per member), ``seconds``.
    history
        Per-epoch losses, one row per member and epoch (column ``member``).
    """

    def __init__(
        self,
        net: ASIGNEnsemble,
        *,
        architecture: ArchitectureConfig,
        training: TrainingConfig,
        genes: Sequence[str],
        feature_dims: Mapping[str, int],
        features_key: str = "asign",
        graph_key: str = "spatial3d",
        counts_layer: str | None = None,
        library_key: str = "section",
        known_sections: Sequence[str] = (),
        sample_key: str | None = None,
        samples: Mapping[str, Sequence[str]] | None = None,
        windows_px: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
        history: pd.DataFrame | Mapping[str, list] | None = None,
    ) -> None:
        self.net = net
        self.architecture = architecture
        self.training = training
        self.genes: list[str] = [str(g) for g in genes]
        self.feature_dims: dict[str, int] = {k: int(feature_dims[k]) for k in FEATURE_DIMS}
        self.features_key = features_key
        self.graph_key = graph_key
        self.counts_layer = counts_layer
        self.library_key = library_key
        self.known_sections: list[str] = [str(s) for s in known_sections]
        self.sample_key = sample_key
        self.samples: dict[str, list[str]] | None = (
            None if samples is None else {str(k): [str(s) for s in v] for k, v in samples.items()}
        )
        self.windows_px: dict[str, Any] = _jsonable(dict(windows_px or {}))
        self.run: dict[str, Any] = _jsonable(dict(run or {}))
        self.history = history

    # -- construction -----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        architecture: ArchitectureConfig,
        training: TrainingConfig,
        genes: Sequence[str],
        feature_dims: Mapping[str, int],
        n_models: int = 1,
        **fields: Any,
    ) -> ASIGNModel:
        """A new, untrained model (the network initialised from torch's current seed)."""
        if isinstance(n_models, bool) or not isinstance(n_models, int) or n_models < 1:
            raise ValueError(f"n_models must be a positive integer, got {n_models!r}.")
        net = ASIGNEnsemble(
            *(int(feature_dims[k]) for k in FEATURE_DIMS),
            len(genes),
            n_models=n_models,
            **{k: v for k, v in architecture.to_dict().items() if k not in PREDICTION_ONLY},
        )
        return cls(
            net,
            architecture=architecture,
            training=training,
            genes=genes,
            feature_dims=feature_dims,
            **fields,
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ASIGNModel:
        """A new, untrained model from the :attr:`settings` layout (of a model or checkpoint)."""
        arch = dict(settings["architecture"])
        # models saved before the linear member existed predict as they did (networks only)
        arch.setdefault("ridge_member", 0.0)
        # ... and were built with GATv2 layers
        arch.setdefault("gat_variant", "gatv2")
        # ... and with both attention blocks (the defaults until they measured worse)
        arch.setdefault("cross_attention", True)
        arch.setdefault("graph_attention", True)
        # ... and, without cross-attention, averaged their projected tokens
        arch.setdefault("token_pooling", "project_then_mean")
        dims = {k: arch.pop(k) for k in FEATURE_DIMS}
        n_genes = arch.pop("n_genes")
        n_models = int(arch.pop("n_models", 1))
        genes = list(settings.get("genes") or [f"gene_{i}" for i in range(n_genes)])
        if len(genes) != n_genes:
            raise ValueError(f"settings name {len(genes)} genes for n_genes={n_genes}.")
        stored = dict(settings.get("training", {}))
        run = {k: stored.pop(k) for k in _RUN_KEYS if k in stored}
        normalization = settings.get("normalization", {})
        features = settings.get("features", {})
        training = TrainingConfig.from_dict(
            {
                **stored,
                "loss_weights": LossWeights(**settings.get("loss", {})),
                "standardize_features": features.get("standardize", "section"),
                "target_sum": normalization.get("target_sum", 1e4),
            }
        )
        return cls.build(
            architecture=ArchitectureConfig.from_dict(arch),
            training=training,
            genes=genes,
            feature_dims=dims,
            n_models=n_models,
            features_key=features.get("key", "asign"),
            graph_key=settings.get("graph", {}).get("key", "spatial3d"),
            counts_layer=normalization.get("layer"),
            library_key=settings.get("library_key", "section"),
            known_sections=settings.get("known_sections", ()),
            sample_key=settings.get("sample_key"),
            samples=settings.get("samples"),
            windows_px=settings.get("targets", {}).get("windows_px"),
            run=run,
        )

    # -- properties -------------------------------------------------------------------
    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch losses: one row per member and epoch (columns ``member``, ``epoch`` ...)."""
        return self._history

    @history.setter
    def history(self, value: pd.DataFrame | Mapping[str, list] | None) -> None:
        self._history = pd.DataFrame(value if value is not None else {})

    @property
    def n_models(self) -> int:
        """Number of networks in the ensemble."""
        return len(self.net.members)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything but the weights as one plain-JSON dict (``settings.json`` of a folder)."""
        training = self.training.to_dict()
        training.pop("loss_weights")
        standardize = training.pop("standardize_features")
        target_sum = training.pop("target_sum")
        return _jsonable(
            {
                "architecture": {
                    **self.feature_dims,
                    "n_genes": len(self.genes),
                    **self.architecture.to_dict(),
                    "n_models": self.n_models,
                },
                "genes": self.genes,
                "normalization": {
                    "method": "log1p_library_size",
                    "target_sum": target_sum,
                    "layer": self.counts_layer,
                },
                "features": {"key": self.features_key, "standardize": standardize},
                "graph": {"key": self.graph_key},
                "targets": {"windows_px": self.windows_px},
                "library_key": self.library_key,
                "known_sections": self.known_sections,
                "sample_key": self.sample_key,
                "samples": self.samples,
                "loss": self.training.loss_weights.to_dict(),
                "training": {**training, "lr": self.training.learning_rate, **self.run},
            }
        )

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> ASIGNModel:
        """Move the network to ``device`` (``"auto"`` allowed); returns ``self``."""
        self.net.to(resolve_device(device))
        return self

    def __repr__(self) -> str:
        attention = [
            k for k in ("cross_attention", "graph_attention") if getattr(self.architecture, k)
        ]
        epochs = int(self.history["epoch"].count()) if "epoch" in self.history else 0
        return (
            f"ASIGNModel(n_genes={len(self.genes)}, hidden_dim={self.architecture.hidden_dim}, "
            + (f"attention={attention}, " if attention else "")
            + f"trained_on={self.known_sections}, epochs={epochs})"
        )

    # -- prediction -------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        inputs: GraphInputs,
        values: np.ndarray,
        known: np.ndarray,
        *,
        device: str | torch.device = "auto",
        chunk_size: int | None = PREDICT_CHUNK_SIZE,
        max_memory_gb: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the network on a stack's inputs and propagate ``values`` of ``known`` spots.

        Parameters
        ----------
        inputs
            The stack's (standardised, not yet reduced) inputs
            (:meth:`asign_sc.models.StackData.from_table`).
        values
            ``(n_obs, n_genes)`` normalised measured expression of the known spots (other
            rows are ignored).
        known
            ``(n_obs,)`` boolean mask of the known spots (may be all ``False``).
        device
            Where to run.
        chunk_size
            Run the network on this many spots at a time (exact: round by round over
            chunks of the graph, see :meth:`~asign_sc.models.MSAGNet.forward_layerwise`), so
            memory grows with the chunk, not the stack; the propagation runs over the whole
            graph. ``None``: all spots at once.
        max_memory_gb
            Memory budget; ``None``: the memory available now. The estimate is checked
            before any work and an :class:`~asign_sc.models.InsufficientMemoryError` names
            the setting to change.

        Returns
        -------
        NumPy arrays: ``prediction`` (blend), ``spot`` (network), ``propagated``,
        ``coverage``, ``gate`` and, with several members, ``prediction_std``/``spot_std``.
        """
        mismatch = {k: (v, self.feature_dims[k]) for k, v in inputs.dims.items()}
        mismatch = {k: v for k, v in mismatch.items() if v[0] != v[1]}
        if mismatch:
            from asign_sc._errors import InvalidStackError

            raise InvalidStackError(
                f"Feature sizes of this stack differ from the model's (stack, model): "
                f"{mismatch}. Extract features with the encoder the model was trained with."
            )
        dev = resolve_device(device)
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}.")
        check_memory(
            prediction_bytes(self, inputs, chunk_size),
            memory_budget(max_memory_gb, dev),
            what=f"Prediction on {inputs.spot.shape[0]} spots (chunk_size={chunk_size})",
        )
        net = self.net.to(dev).eval()
        reduced = inputs.to(dev).reduced(net)
        out = net(
            *reduced.args(),
            torch.as_tensor(values, dtype=torch.float32, device=dev),
            torch.as_tensor(known, dtype=torch.bool, device=dev),
            chunk_size=chunk_size,
        )
        keep = ("prediction", "spot", "propagated", "coverage", "gate")
        keep += ("prediction_std", "spot_std")
        return {k: out[k].cpu().numpy() for k in keep if k in out}

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``weights.pt``, ``settings.json``, ``history.csv``.

        ``weights.pt`` holds tensors only (``torch.load(..., weights_only=True)`` reads it);
        ``settings.json`` is readable JSON. The folder is written beside ``path`` and moved
        into place when complete.

        Parameters
        ----------
        path
            The folder to write.
        overwrite
            Replace an existing ``path`` (only once the new folder is complete).

        Returns
        -------
        ``path``.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists; pass overwrite=True to replace it, or choose another path."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            torch.save(state, tmp / WEIGHTS_FILE)
            header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
            (tmp / SETTINGS_FILE).write_text(json.dumps({**header, **self.settings}, indent=2))
            if not self.history.empty:
                self.history.to_csv(tmp / HISTORY_FILE, index=False)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        logger.info("Saved ASIGN model to %s/", path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> ASIGNModel:
        """Read a model folder written by :meth:`save` (or a single-file checkpoint of 0.1)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No asign_sc model at {path}.")
        if path.is_dir():
            settings, state, history = _read_folder(path)
        else:
            settings, state, history = _read_file(path)
        version = settings.get("version", 1)
        if version > CHECKPOINT_VERSION:
            raise ValueError(
                f"{path} was written by a newer asign_sc (model format version {version}); "
                "upgrade asign_sc to read it."
            )
        model = cls.from_settings(settings)
        try:
            model.net.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"{path}: the weights do not fit the architecture in its settings ({error})."
            ) from None
        model.history = history
        model.net.eval()
        return model.to(device)

    def copy(self) -> ASIGNModel:
        """A deep copy."""
        return copy.deepcopy(self)


def prediction_bytes(
    model: ASIGNModel, inputs: GraphInputs, chunk_size: int | None
) -> MemoryEstimate:
    """Memory of :meth:`ASIGNModel.predict`: reduced features, a chunk, whole-stack outputs."""
    n_obs, n_edges = inputs.spot.shape[0], int(inputs.edge_index.shape[1])
    arch = model.architecture
    n_components = arch.n_components
    dims = {k: min(n_components, v) if n_components else v for k, v in inputs.dims.items()}
    n_tokens = {
        "region": int(inputs.region_tokens.shape[1]),
        "global": int(inputs.global_tokens.shape[1]),
    }
    reduced = n_obs * (dims["spot_dim"] + sum(n_tokens[k] * dims[f"{k}_dim"] for k in n_tokens))
    sizes = {
        "dims": dims,
        "n_tokens": n_tokens,
        "n_genes": len(model.genes),
        "hidden_dim": arch.hidden_dim,
        "n_heads": arch.n_heads,
        "n_gat_layers": arch.n_gat_layers,
        "n_iterations": arch.n_iterations,
        "gat_variant": arch.gat_variant,
        "cross_attention": arch.cross_attention,
        "token_pooling": arch.token_pooling,
        "graph_attention": arch.graph_attention,
    }
    return chunked_pass_bytes(
        n_obs, n_edges, chunk_size, n_members=model.n_models, **sizes
    ) + MemoryEstimate({"features": reduced * FLOAT})


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with our own words for files that are not ours."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty or truncated: it holds no {what}. Save the model again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} is empty or truncated ({type(error).__name__}); save the model again."
        ) from None
    except Exception as error:  # torch raises several types for foreign files
        if "truncated" in str(error).lower() or "failed finding central" in str(error).lower():
            raise ValueError(f"{path} is empty or truncated; save the model again.") from None
        raise ValueError(
            f"{path} is not an asign_sc model file (write one with ASIGNModel.save)."
        ) from None


def _read_folder(path: Path) -> tuple[dict, dict, pd.DataFrame]:
    settings_file = path / SETTINGS_FILE
    if not settings_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{path} is not an asign_sc model folder: it needs {SETTINGS_FILE} and "
            f"{WEIGHTS_FILE} (written by ASIGNModel.save)."
        )
    try:
        settings = json.loads(settings_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{settings_file} is not valid JSON ({error}).") from None
    if not isinstance(settings, dict) or settings.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{settings_file} is not an asign_sc model file.")
    state = _torch_load(path / WEIGHTS_FILE, "weights")
    history_file = path / HISTORY_FILE
    history = pd.read_csv(history_file) if history_file.is_file() else pd.DataFrame()
    return settings, state, history


def _read_file(path: Path) -> tuple[dict, dict, pd.DataFrame]:
    checkpoint = _torch_load(path, "model")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an asign_sc model file (write one with ASIGNModel.save).")
    settings = {**checkpoint["settings"], "version": checkpoint.get("version", 1)}
    return settings, checkpoint["state_dict"], pd.DataFrame(checkpoint.get("history") or {})


def _jsonable(value: Any) -> Any:
    """Plain JSON types only."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"Setting of type {type(value).__name__} cannot be stored in a model file.")
