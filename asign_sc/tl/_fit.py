"""``fit_asign``: train MSAGNet + cross-layer imputation on a stack with known sections."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from asign_sc._allocator import reuses_freed_memory
from asign_sc._docs import doc_params
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, validate_counts
from asign_sc._utils import resolve_device, update_params
from asign_sc.models._config import ArchitectureConfig, TrainingConfig
from asign_sc.models._data import StackData, known_targets, resolve_windows
from asign_sc.models._distributed import fit_members
from asign_sc.models._model import ASIGNModel
from asign_sc.models._sampling import tile_coordinates
from asign_sc.pp._expression import known_rows, resolve_known_sections, select_genes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["fit_asign"]

logger = logging.getLogger(__name__)


@reuses_freed_memory
@doc_params()
def fit_asign(
    data: AnnData | SpatialData,
    *,
    known_sections: Sequence[str] | Mapping[str, Sequence[str]],
    genes: Sequence[str] | None = None,
    n_top_genes: int = 250,
    counts_layer: str | None = None,
    library_key: str = Key.obs.library,
    sample_key: str | None = None,
    features_key: str = "asign",
    graph_key: str = Key.obsp.graph3d,
    architecture: ArchitectureConfig | None = None,
    training: TrainingConfig | None = None,
    n_models: int = 3,
    epochs: int = 300,
    device: str | torch.device = "auto",
    devices: int = 1,
    seed: int = 0,
    show_progress_bar: bool = True,
    key_added: str = "asign",
) -> ASIGNModel:
    """Train ASIGN (MSAGNet + cross-layer imputation) on a stack with known sections.

    Expression of the known sections is normalised as ``log1p`` of library-size-normalised
    counts (counts per ``training.target_sum``, library size over all genes), the same at
    prediction; region and global targets sum the counts of the spots in the region/global
    window (eq. 10). Stacks of up to 5,000 spots train full-graph: every epoch runs the
    network on all spots of the stack (images only) and propagates labels over the 3D graph;
    larger ones train on mini-batches, tiles of the known spots with their neighbourhood in
    the graph (``TrainingConfig(batch_size=...)``, see :doc:`/concepts`, "Large stacks"),
    after a memory estimate that fails early, naming the setting to change, when it does not
    fit. Each epoch hides a random
    ``mask_fraction`` of the training spots from the propagation input and supervises the
    blended prediction on exactly those spots, so a spot's own label never enters its
    prediction; the network heads are supervised on all training spots (eq. 7-9). A
    ``validation_fraction`` of the known spots is never used for training: early stopping
    watches the loss of the blended prediction on them.

    Parameters
    ----------
    data
        AnnData or SpatialData with image features (:func:`asign_sc.tl.extract_features`)
        and a 3D graph (:func:`asign_sc.gr.build_3d_graph`).
    known_sections
        Sections with measured expression (raw counts in ``X`` or ``counts_layer``). For a
        cohort (``sample_key``) also a mapping ``{{sample: sections}}``: every section of the
        training samples and at least one section of each target sample (the paper's
        protocol); one model is fitted on all of them.
    genes
        Genes to model; default the ``n_top_genes`` of highest mean count over the known
        spots (:func:`asign_sc.pp.select_genes`).
    n_top_genes
        Number of genes when ``genes`` is not given (paper: 250).
    {counts_layer}
    {library_key}
    sample_key
        ``obs`` column naming the sample (patient) of each spot when ``data`` holds a cohort.
        Every sample needs a known section; build the graph with the same ``sample_key``
        (:func:`asign_sc.gr.build_3d_graph`) so that propagation stays inside each sample.
        The samples and their known sections are recorded (``model.samples``).
    {features_key}
    {graph_key}
    architecture
        The network (:class:`~asign_sc.models.ArchitectureConfig`: widths, depth, the
        cross-attention and graph-attention blocks, PCA components, the linear member).
        Default: the paper's widths and depth without its two attention blocks, which
        measure better on her2st; ``ArchitectureConfig.paper()`` gives the paper's network.
    training
        How to train (:class:`~asign_sc.models.TrainingConfig`: optimiser, masking,
        validation, early stopping, loss weights, feature standardisation, ``target_sum``,
        target windows); default the paper's.
    n_models
        Train this many networks (seeds ``seed``, ``seed + 1``, ..., each with its own
        held-out spots) and average them; their spread becomes the uncertainty of
        :func:`asign_sc.tl.impute`. One known section gives few training spots, so the average
        is noticeably better than one network (about +0.02 per-gene PCC on her2st), at
        ``n_models`` times the training time.
    epochs
        Maximum number of full-graph epochs (one optimiser step each).
    {device}
    devices
        Train on this many processes with :class:`~torch.nn.parallel.DistributedDataParallel`
        (``gloo`` on CPU; ``nccl`` with one CUDA device each), the mini-batches shared out
        between them; 1 (default) trains in this process. The processes are spawned by this
        call, or, when the script runs under ``torchrun`` (``RANK``/``WORLD_SIZE`` set),
        the launcher's processes are joined (then save results on rank 0 only). A process
        that fails makes the call raise and leaves the stack unchanged. See
        :doc:`/concepts`, "Several processes".
    seed
        Seed of the initialisation and of every random split; CPU training is deterministic.
    {show_progress_bar}
    key_added
        Training parameters and history go to ``uns[key_added]["fit"]`` (other entries of
        ``uns[key_added]``, such as the features' parameters, are kept).

    Returns
    -------
    The fitted model; ``model.history`` is a DataFrame of the per-epoch losses and wall
    seconds (columns ``seconds``, validation included, and ``member``, which network of the
    ensemble).
    """
    t0 = time.perf_counter()
    architecture, training = architecture or ArchitectureConfig(), training or TrainingConfig()
    _check_positive(epochs=epochs, n_models=n_models)
    stack, known_sections, samples = resolve_known_sections(
        data, known_sections, library_key=library_key, sample_key=sample_key
    )
    table = stack.table
    known_sections, rows, genes = _known_spots_and_genes(
        stack, known_sections, genes, n_top_genes=n_top_genes, counts_layer=counts_layer
    )
    windows = resolve_windows(
        table, stack, features_key, training.region_size, training.global_size
    )

    def targets(target_rows: np.ndarray, level_windows: dict | None = None) -> dict:
        return known_targets(
            table,
            stack,
            rows=target_rows,
            genes=genes,
            counts_layer=counts_layer,
            target_sum=training.target_sum,
            windows=level_windows,
        )

    stack_data = StackData.from_table(
        table,
        stack,
        features_key=features_key,
        graph_key=graph_key,
        standardize=training.standardize_features,
        max_memory_gb=training.max_memory_gb,
    )
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = ASIGNModel.build(
        architecture=architecture,
        training=training,
        genes=genes,
        feature_dims=stack_data.inputs.dims,
        n_models=int(n_models),
        features_key=features_key,
        graph_key=graph_key,
        counts_layer=counts_layer,
        library_key=library_key,
        known_sections=known_sections,
        sample_key=sample_key,
        samples=samples,
        windows_px=windows,
    )
    model.net.fit_reduction(stack_data.inputs.features(), seed=seed)
    inputs = stack_data.inputs.reduced(model.net)
    del stack_data  # the wide features are not needed once reduced
    fit = fit_members(
        model.net.members,
        training,
        devices=devices,
        epochs=int(epochs),
        inputs=inputs,
        rows=rows,
        spot_targets=targets(rows)["spot"],
        pool_targets=lambda pool: targets(pool, windows),
        seed=seed,
        device=dev,
        **_known_coords(stack, rows),
        show_progress_bar=show_progress_bar,
    )
    model.net.eval()
    model.history = fit.history
    model.run = {
        "epochs": int(epochs),
        "seed": seed,
        "best_epoch": fit.best_epochs,
        "validation_obs": [table.obs_names[rows[v]].tolist() for v in fit.validation_positions],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _record_fit(table, model, n_known=len(rows), device=dev, key_added=key_added)
    return model


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _known_spots_and_genes(
    stack: SectionStack,
    known_sections: Sequence[str] | str,
    genes: Sequence[str] | None,
    *,
    n_top_genes: int,
    counts_layer: str | None,
) -> tuple[list[str], np.ndarray, list[str]]:
    """The known sections, their rows (validated raw counts) and the genes to model."""
    known_sections = [known_sections] if isinstance(known_sections, str) else known_sections
    known_sections = [str(s) for s in known_sections]
    rows = known_rows(stack, known_sections)
    validate_counts(
        stack.table,
        counts_layer,
        rows={s: stack[s].rows for s in known_sections},
        what="known sections",
    )
    if len(known_sections) == len(stack) and len(stack) > 1:
        logger.warning("Every section is known; there is nothing to impute across sections.")
    if genes is None:
        genes = select_genes(
            stack.data,
            known_sections=known_sections,
            n_top_genes=min(n_top_genes, stack.table.n_vars),
            counts_layer=counts_layer,
            library_key=stack.library_key,
        )
    return known_sections, rows, [str(g) for g in genes]


def _known_coords(stack: SectionStack, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Known spots' positions for blocked validation (``coords``) and mini-batch tiles."""
    return {"coords": _separated_coords(stack)[rows], "tile_coords": tile_coordinates(stack)[rows]}


def _separated_coords(stack: SectionStack) -> np.ndarray:
    """Spot centres of every section in its own frame, sections side by side far apart."""
    coords = np.zeros((stack.table.n_obs, 2))
    offset = 0.0
    for section in stack:
        xy = section.spatial - section.spatial.min(0)
        coords[section.rows] = xy + np.array([offset, 0.0])
        offset += float(xy[:, 0].max()) * 2 + 1e6
    return coords


def _record_fit(
    table: AnnData, model: ASIGNModel, *, n_known: int, device: torch.device, key_added: str
) -> None:
    """Write the fit's parameters and history to ``uns[key_added]["fit"]`` and log it."""
    settings = model.settings
    settings["training"].pop("validation_obs", None)
    update_params(
        table,
        key_added,
        "fit",
        {
            **settings,
            "n_known_spots": n_known,
            "device": str(device),
            "history": model.history.to_dict(orient="list"),
        },
    )
    logger.info(
        "Fitted ASIGN (%d model(s)) on %d known spots of %s (%d genes, %d epochs, best %s, "
        "%.1fs on %s); parameters and history in uns[%r]['fit'].",
        model.n_models,
        n_known,
        model.known_sections,
        len(model.genes),
        len(model.history),
        model.run["best_epoch"],
        model.run["seconds"],
        device,
        Key.uns.params(key_added),
    )
