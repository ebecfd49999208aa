"""The end-to-end pipeline behind ``asign-sc run``."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asign_sc._allocator import reuses_freed_memory
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._outputs import atomic_folder, check_output_folder
from asign_sc._stack import (
    SectionStack,
    get_table,
    resolve_stack,
    validate_counts,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = [
    "FeatureView",
    "check_encoder",
    "check_known",
    "check_views",
    "check_zarr_store",
    "load_input",
    "run_pipeline",
    "stack_report",
    "write_zarr",
]

logger = logging.getLogger(__name__)

EVALUATION_BASELINES = ("mean", "propagation", "ridge", "ridge_propagation")
"""Baselines scored beside ASIGN by ``asign-sc run``: the trivial one and the strongest."""

STAIN_NORMALIZATIONS = ("macenko",)


@dataclass(frozen=True)
class FeatureView:
    """One more embedding of the spot windows for a feature-view ensemble.

    ``asign-sc run --add-view ENCODER[:STAIN]``: the windows are embedded again with
    ``encoder`` (and ``stain_normalization``) under :attr:`key`, a second model is fitted on
    them and :func:`asign_sc.tl.impute` averages the models.

    Attributes
    ----------
    encoder
        A registered image encoder (e.g. ``"efficientnet_lite2"``) or a timm model name.
    stain_normalization
        ``None`` (as scanned) or ``"macenko"``.
    """

    encoder: str
    stain_normalization: str | None = None

    @classmethod
    def parse(cls, spec: str) -> FeatureView:
        """``"ENCODER"`` or ``"ENCODER:STAIN"`` (``STAIN``: ``macenko`` or ``none``)."""
        spec = str(spec).strip()
        head, colon, tail = spec.rpartition(":")
        choices = ("none", *STAIN_NORMALIZATIONS)
        if colon and tail.strip().lower() in choices:
            encoder, stain = head.strip(), tail.strip().lower()
        elif colon and head.strip().lower() not in ("timm", "obsm"):  # ENCODER:STAIN
            raise ValueError(
                f"--add-view {spec}: unknown stain normalisation {tail!r}; use "
                f"{' or '.join(choices)}."
            )
        else:  # no stain, or a prefixed name such as timm:NAME
            encoder, stain = spec, "none"
        if not encoder or encoder.lower().split(":")[0] == "obsm":
            raise ValueError(
                f"--add-view {spec}: not a feature view; give an image encoder and optionally a "
                "stain normalisation, e.g. efficientnet_lite2 or efficientnet_lite2:macenko "
                "(precomputed embeddings, obsm:KEY, can only be the main --encoder)."
            )
        return cls(encoder.strip(), None if stain == "none" else stain)

    @property
    def key(self) -> str:
        """Its ``features_key`` / ``key_added``: ``asign_<encoder>[_<stain>]``."""
        name = "".join(c if c.isalnum() else "_" for c in self.encoder.lower())
        return f"asign_{name}" + (
            f"_{self.stain_normalization}" if self.stain_normalization else ""
        )


def load_input(
    *,
    demo: bool = False,
    zarr: Path | None = None,
    her2st: Path | None = None,
    patient: str | None = None,
    seed: int = 0,
) -> SpatialData:
    """Load the stack named on the command line."""
    if demo:
        from asign_sc.datasets import synthetic_stack

        logger.info("simulating the demo stack (synthetic_stack, seed=%d)", seed)
        sdata, _ = synthetic_stack(seed=seed)
        return sdata
    if her2st is not None:
        from asign_sc.io import read_her2st

        logger.info("reading her2st patient %s from %s", patient, her2st)
        return read_her2st(her2st, patient=patient)
    check_zarr_store(zarr)
    import spatialdata

    logger.info("reading %s", zarr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return spatialdata.read_zarr(zarr)
    except Exception as error:  # zarr, ome-zarr, anndata and json errors alike
        raise InvalidStackError(
            f"Could not read the SpatialData zarr store {zarr} ({type(error).__name__}: "
            f"{error}). It may be incomplete (a run stopped while writing it); write it again."
        ) from error


def check_zarr_store(path: Path | None) -> None:
    """Raise if ``path`` is not a zarr store (a folder with zarr group metadata).

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    ValueError
        A file, or a folder without ``zarr.json`` (zarr v3) or ``.zgroup`` (zarr v2).
    """
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"No SpatialData zarr store at {path}.")
    path = Path(path)
    if not path.is_dir() or not any((path / m).is_file() for m in ("zarr.json", ".zgroup")):
        what = "a file" if not path.is_dir() else "a folder without zarr.json or .zgroup"
        raise ValueError(
            f"{path} is not a SpatialData zarr store ({what}); pass a store written by "
            "SpatialData.write, or use --her2st DIR / --demo."
        )


def check_encoder(data: AnnData | SpatialData, encoder: str) -> None:
    """Raise ``ValueError`` if ``encoder="obsm:KEY"`` names embeddings the table lacks."""
    if not encoder.lower().startswith("obsm:"):
        return
    key = encoder.split(":", 1)[1]
    table = get_table(data)
    if not key or key not in table.obsm:
        raise ValueError(
            f"--encoder {encoder}: the table has no obsm[{key!r}] (it has "
            f"{sorted(table.obsm)}); name one of those, or an image encoder such as default."
        )


def check_views(
    views: Sequence[FeatureView | str], encoder: str, stain_normalization: str | None
) -> list[FeatureView]:
    """``views`` as :class:`FeatureView` objects; ``ValueError`` for a bad or repeated one."""
    from asign_sc.models.encoders._registry import DEFAULT_ENCODER

    def name(encoder: str) -> str:
        return DEFAULT_ENCODER if encoder.lower() == "default" else encoder.lower()

    parsed = [v if isinstance(v, FeatureView) else FeatureView.parse(v) for v in views]
    seen = {(name(encoder), stain_normalization)}
    for view in parsed:
        if view.encoder.lower().startswith("obsm:"):
            raise ValueError(
                f"--add-view {view.encoder}: a view re-embeds the images; precomputed "
                "embeddings (obsm:KEY) can only be the main features (--encoder obsm:KEY)."
            )
        if view.stain_normalization not in (None, *STAIN_NORMALIZATIONS):
            raise ValueError(
                f"Feature view {view}: stain_normalization must be None or one of "
                f"{list(STAIN_NORMALIZATIONS)}."
            )
        which = (name(view.encoder), view.stain_normalization)
        if which in seen:
            raise ValueError(
                f"--add-view {view.encoder}"
                f"{':' + view.stain_normalization if view.stain_normalization else ''} repeats "
                "a view already used (the main --encoder/--stain-normalization or another "
                "--add-view); every view must differ."
            )
        seen.add(which)
    return parsed


def check_known(data: AnnData | SpatialData, known: Sequence[str] | None, library_key: str) -> None:
    """Raise ``ValueError`` if ``--known`` names a section the stack does not have."""
    table = get_table(data)
    if not known or library_key not in table.obs:
        return  # no choice made, or the stack check reports the missing column itself
    names = [str(s) for s in table.obs[library_key].astype(str).unique()]
    missing = [s for s in known if s not in names]
    if missing:
        raise ValueError(
            f"--known {' '.join(missing)}: not a section of this stack; its sections are "
            f"{' '.join(names)}."
        )


def stack_report(stack: SectionStack, known: Sequence[str]) -> list[dict[str, Any]]:
    """One row per section: spots, image size, spot radius, whether it is measured."""
    rows = []
    for section in stack:
        rows.append(
            {
                "section": section.name,
                "sample": section.sample,
                "spots": section.n_spots,
                "image_px": list(section.image_shape[::-1]) if section.image_shape else None,
                "spot_radius_px": round(section.spot_radius, 2),
                "known": section.name in known,
            }
        )
    return rows


@reuses_freed_memory
def run_pipeline(
    sdata: SpatialData,
    *,
    out: Path,
    known: Sequence[str] | None = None,
    library_key: str = Key.obs.library,
    encoder: str = "default",
    stain_normalization: str | None = None,
    extra_views: Sequence[FeatureView | str] = (),
    transform: str = "rigid",
    epochs: int = 300,
    device: str = "auto",
    devices: int = 1,
    client: Any = None,
    seed: int = 0,
    overwrite: bool = False,
    log_file: Path | None = None,
    log_offset: int = 0,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Run ASIGN end to end on a stack and write everything to ``out``.

    Steps: validate, register the sections (:func:`asign_sc.tl.register_sections`), embed
    the spot windows (:func:`asign_sc.tl.extract_features`), build the 3D graph
    (:func:`asign_sc.gr.build_3d_graph`), fit the model on the ``known`` sections
    (:func:`asign_sc.tl.fit_asign`), impute every spot (:func:`asign_sc.tl.impute`) and,
    where the other sections have measured counts, score the imputation beside the
    baselines (:func:`asign_sc.tl.evaluate`: the known mean profile, propagation, ridge on
    the image features and ridge + label spreading).

    Writes ``out/stack.zarr`` (the SpatialData with every result), ``out/model/`` (the model
    folder), ``out/metrics.json`` and ``out/metrics.csv`` (scores per method), figures
    (``registration.png``, ``sections_<gene>.png``, ``training.png``, ``metrics.png``) and
    ``out/summary.json`` (the stack, the steps with their seconds, the outputs).
    Returns the summary.

    For long jobs: ``devices`` is passed to :func:`asign_sc.tl.fit_asign` (training on
    several devices), ``client`` (a ``dask.distributed.Client``) to
    :func:`asign_sc.tl.extract_features` and :func:`asign_sc.tl.register_sections`. Each step
    logs a line when it starts and ends (logger ``asign_sc._pipeline``); ``log_file``, the
    file those lines go to, is copied into the result as ``asign-sc.log`` from byte
    ``log_offset`` on (this run's lines). ``encoder`` and ``stain_normalization`` are
    passed to :func:`asign_sc.tl.extract_features`, ``transform`` to
    :func:`asign_sc.tl.register_sections`. ``show_progress_bar`` shows the progress bars of
    registration, features and training (``asign-sc run --quiet`` hides them).

    ``extra_views`` (:class:`FeatureView`, or ``"ENCODER[:STAIN]"`` strings) makes the
    imputation a feature-view ensemble: the windows are embedded once more per view (under
    ``obsm[f"X_{view.key}_..."]``), one more model is fitted per view on the same genes, and
    :func:`asign_sc.tl.impute` averages all models; each is saved, the extra ones as
    ``out/model_<view key>/``. On her2st patient C, Lite0 features of Macenko-normalised
    windows plus a ``"efficientnet_lite2"`` view measured +0.002/+0.006 per-gene PCC over
    the default (known C2/C4), at about three times the feature time and twice the fit
    time.

    Everything is checked before the first step. The outputs are written into a temporary
    folder beside ``out`` and moved into place when complete; with ``overwrite=True`` an
    earlier result in ``out`` is replaced only then. A run that fails or is stopped leaves
    ``out`` as it was (see :mod:`asign_sc._outputs`).
    """
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    stack = resolve_stack(sdata, library_key=library_key, min_sections=2)
    known = list(known) if known else [stack.names[0]]
    for name in known:
        stack[name]  # raises a clear error for an unknown section name
    validate_counts(
        stack.table, rows={name: stack[name].rows for name in known}, what="known sections"
    )
    try:
        check_encoder(sdata, encoder)
    except ValueError as error:
        raise InvalidStackError(str(error)) from None
    views = check_views(extra_views, encoder, stain_normalization)
    report = stack_report(stack, known)
    _log_report(stack, report)
    missing = [s.name for s in stack if not s.has_image]
    if missing:
        raise InvalidStackError(
            f"Sections {missing} have no image; asign-sc run needs the H&E image of every "
            "section (leave those sections out, or add their images)."
        )
    with atomic_folder(out, overwrite=overwrite) as work:
        return _run_steps(
            sdata,
            stack=stack,
            report=report,
            work=work,
            out=out,
            known=known,
            library_key=library_key,
            encoder=encoder,
            stain_normalization=stain_normalization,
            views=views,
            transform=transform,
            epochs=epochs,
            device=device,
            devices=devices,
            client=client,
            seed=seed,
            log_file=log_file,
            log_offset=log_offset,
            show_progress_bar=show_progress_bar,
        )


def _run_steps(
    sdata: SpatialData,
    *,
    stack: SectionStack,
    report: list[dict[str, Any]],
    work: Path,
    out: Path,
    known: list[str],
    library_key: str,
    encoder: str,
    stain_normalization: str | None,
    views: list[FeatureView],
    transform: str,
    epochs: int,
    device: str,
    devices: int,
    client: Any,
    seed: int,
    log_file: Path | None,
    log_offset: int,
    show_progress_bar: bool,
) -> dict[str, Any]:
    """The steps of :func:`run_pipeline`, writing into ``work`` (renamed to ``out`` later)."""
    from asign_sc import gr, tl

    store = work / "stack.zarr"
    timings: dict[str, float] = {}
    unknown = [s.name for s in stack if s.name not in known]
    evaluated = bool(unknown) and _has_counts(stack, unknown)
    n_steps = 8 if evaluated else 7

    def step(name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        number = len(timings) + 1
        logger.info("step %d/%d %s: started", number, n_steps, name)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        logger.info("step %d/%d %s: done in %.1f s", number, n_steps, name, timings[name])
        return result

    step(
        "register",
        tl.register_sections,
        sdata,
        library_key=library_key,
        transform=transform,
        seed=seed,
        client=client,
        show_progress_bar=show_progress_bar,
    )
    feature_kwargs = {
        "windows": spot_windows(stack),
        "device": device,
        "library_key": library_key,
        "client": client,
        "show_progress_bar": show_progress_bar,
    }

    def features() -> None:
        tl.extract_features(
            sdata, encoder=encoder, stain_normalization=stain_normalization, **feature_kwargs
        )
        for view in views:
            tl.extract_features(
                sdata,
                encoder=view.encoder,
                stain_normalization=view.stain_normalization,
                key_added=view.key,
                **feature_kwargs,
            )

    step("features", features)
    step("graph", gr.build_3d_graph, sdata, library_key=library_key)
    fit_kwargs = {
        "known_sections": known,
        "library_key": library_key,
        "epochs": epochs,
        "device": device,
        "seed": seed,
        "devices": devices,
        "show_progress_bar": show_progress_bar,
    }

    def fit() -> list[Any]:
        models = [tl.fit_asign(sdata, **fit_kwargs)]
        for view in views:
            models.append(
                tl.fit_asign(
                    sdata,
                    genes=models[0].genes,
                    features_key=view.key,
                    key_added=view.key,
                    **fit_kwargs,
                )
            )
        return models

    models = step("fit", fit)
    model = models[0]
    step("impute", tl.impute, sdata, models if views else model, device=device)
    model.save(work / "model")
    for view, extra in zip(views, models[1:], strict=True):
        extra.save(work / f"model_{view.key}")

    outputs = {"zarr": str(out / "stack.zarr"), "model": str(out / "model")}
    outputs |= {f"model_{v.key}": str(out / f"model_{v.key}") for v in views}
    metrics = None
    if evaluated:
        scores = step(
            "evaluate", tl.evaluate, sdata, sections=unknown, baselines=EVALUATION_BASELINES
        )
        scores.to_csv(work / "metrics.csv", index=False)
        overall = scores[scores["section"] == "all"]
        metrics = {
            method: dict(zip(group["metric"], group["value"].round(4), strict=True))
            for method, group in overall.groupby("method", sort=False)
        }
        (work / "metrics.json").write_text(
            json.dumps({"sections": unknown, "known_sections": known, "scores": metrics}, indent=2)
        )
        outputs |= {"metrics": str(out / "metrics.json"), "metrics_csv": str(out / "metrics.csv")}
        for method, values in metrics.items():
            logger.info(
                "  %-12s per-gene PCC %.3f  per-spot PCC %.3f  MSE %.3f",
                method,
                values["pcc_gene"],
                values["pcc_spot"],
                values["mse"],
            )
    else:
        logger.info("no measured counts outside the known sections: nothing to score")
    figures = step("figures", _figures, sdata, model, work, library_key, metrics is not None)
    outputs["figures"] = [str(out / Path(path).name) for path in figures]
    step("write", write_zarr, sdata, store)

    summary = {
        "sections": report,
        "known_sections": known,
        "n_spots": int(stack.table.n_obs),
        "n_genes": int(stack.table.n_vars),
        "seed": seed,
        "devices": devices,
        "feature_views": [
            {"key": "asign", "encoder": encoder, "stain_normalization": stain_normalization},
            *({"key": v.key, **asdict(v)} for v in views),
        ],
        "scheduler": None if client is None else str(client.scheduler.address),
        "steps": timings,
        "metrics": metrics,
        "outputs": outputs,
    }
    if log_file is not None and Path(log_file).is_file():
        logger.info("all steps done; the result is moved into %s", out)
        with open(log_file, "rb") as source, open(work / "asign-sc.log", "wb") as copy:
            source.seek(log_offset)
            shutil.copyfileobj(source, copy)
        outputs["log"] = str(out / "asign-sc.log")
    # Written last: a folder with summary.json is a complete result (asign_sc._outputs).
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", ", ".join(f"{k}={v}" for k, v in outputs.items()))
    return summary


def _figures(
    sdata: SpatialData, model: Any, out: Path, library_key: str, evaluated: bool
) -> list[str]:
    """Registration overlay, measured vs imputed for one gene, training curves, metrics."""
    import matplotlib.pyplot as plt

    from asign_sc import pl

    table = sdata.tables[Key.sdata.table]
    genes = list(table.obsm[Key.layers.imputed].columns)
    gene = "ERBB2" if "ERBB2" in genes else genes[0]
    if evaluated and "ERBB2" not in genes:
        pcc = table.var.loc[genes, "asign_eval_pcc_asign"]
        gene = str(pcc.idxmax()) if pcc.notna().any() else gene
    figures = {
        "registration.png": lambda p: pl.registration(sdata, library_key=library_key, save=p),
        f"sections_{gene}.png": lambda p: pl.sections(
            sdata, gene, library_key=library_key, vmin="p1", vmax="p99", max_side=1000, save=p
        ),
        "training.png": lambda p: pl.training(model, save=p),
    }
    if evaluated:
        figures["metrics.png"] = lambda p: pl.metrics(sdata, save=p)
    written = []
    for name, draw in figures.items():
        draw(out / name)
        written.append(str(out / name))
        plt.close("all")
    return written


def spot_windows(stack: SectionStack) -> tuple[float, float, float]:
    """Spot, region and global window sides in pixels, from the spot geometry.

    The paper's 224/512/1024 px windows on 55 um Visium spots are about 1.5 spot diameters,
    1.75 and 3.5 spot pitches; in spot radii (pitch = 4 radii on ST and 3.6 on Visium):
    3, 7 and 14. On her2st (radius ~73 px) this gives ~218/509/1018 px.
    """
    radius = float(np.median([s.spot_radius for s in stack]))
    return (3 * radius, 7 * radius, 14 * radius)


def _has_counts(stack: SectionStack, sections: Sequence[str]) -> bool:
    rows = np.concatenate([stack[s].rows for s in sections])
    matrix = stack.table.X[rows]
    return bool(matrix.sum() > 0)


def _log_report(stack: SectionStack, report: list[dict[str, Any]]) -> None:
    width = max(len(r["section"]) for r in report)
    logger.info(
        "stack of %d sections, %d spots, %d genes",
        len(stack),
        stack.table.n_obs,
        stack.table.n_vars,
    )
    for r in report:
        logger.info(
            "  %-*s %5d spots  image %s  spot radius %.1f px%s",
            width,
            r["section"],
            r["spots"],
            "x".join(map(str, r["image_px"])) if r["image_px"] else "none",
            r["spot_radius_px"],
            "  (measured)" if r["known"] else "",
        )


def write_zarr(sdata: SpatialData, path: Path, *, overwrite: bool = False) -> None:
    """Write a SpatialData zarr store, without zarr's notice about future sharding defaults."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(path, overwrite=overwrite)
