"""The end-to-end pipeline behind ``asign-sc run``."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc._stack import SectionStack, resolve_stack, validate_counts

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["load_input", "run_pipeline", "stack_report", "write_zarr"]

logger = logging.getLogger(__name__)


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
    if zarr is None or not Path(zarr).exists():
        raise FileNotFoundError(f"No SpatialData zarr store at {zarr}.")
    import spatialdata

    logger.info("reading %s", zarr)
    return spatialdata.read_zarr(zarr)


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


def run_pipeline(
    sdata: SpatialData,
    *,
    out: Path,
    known: Sequence[str] | None = None,
    library_key: str = Key.obs.library,
    encoder: str = "default",
    transform: str = "rigid",
    epochs: int = 300,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ASIGN end to end on a stack and write everything to ``out``.

    Steps: validate, register the sections (:func:`asign_sc.tl.register_sections`), embed
    the spot windows (:func:`asign_sc.tl.extract_features`), build the 3D graph
    (:func:`asign_sc.gr.build_3d_graph`), fit the model on the ``known`` sections
    (:func:`asign_sc.tl.fit_asign`), impute every spot (:func:`asign_sc.tl.impute`) and,
    where the other sections have measured counts, score the imputation beside the
    baselines (:func:`asign_sc.tl.evaluate`).

    Writes ``out/stack.zarr`` (the SpatialData with every result), ``out/model.pt``,
    ``out/metrics.json`` and ``out/metrics.csv`` (scores per method), figures
    (``registration.png``, ``sections_<gene>.png``, ``training.png``, ``metrics.png``) and
    ``out/summary.json`` (the stack, the steps with their seconds, the outputs).
    Returns the summary.
    """
    from asign_sc import gr, tl

    out = Path(out)
    store = out / "stack.zarr"
    if store.exists() and not overwrite:
        raise FileExistsError(f"{store} exists; pass --overwrite to replace it.")
    stack = resolve_stack(sdata, library_key=library_key, min_sections=2)
    known = list(known) if known else [stack.names[0]]
    for name in known:
        stack[name]  # raises a clear error for an unknown section name
    validate_counts(stack.table, rows=np.concatenate([stack[name].rows for name in known]))
    report = stack_report(stack, known)
    _log_report(stack, report)
    missing = [s.name for s in stack if not s.has_image]
    if missing:
        raise InvalidStackError(
            f"Sections {missing} have no image; asign-sc run needs the H&E image of every "
            "section (leave those sections out, or add their images)."
        )
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        logger.info("step %s", name)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        logger.info("step %s done in %.1f s", name, timings[name])
        return result

    step(
        "register",
        tl.register_sections,
        sdata,
        library_key=library_key,
        transform=transform,
        seed=seed,
    )
    step(
        "features",
        tl.extract_features,
        sdata,
        encoder=encoder,
        windows=spot_windows(stack),
        device=device,
        library_key=library_key,
    )
    step("graph", gr.build_3d_graph, sdata, library_key=library_key)
    model = step(
        "fit",
        tl.fit_asign,
        sdata,
        known_sections=known,
        library_key=library_key,
        epochs=epochs,
        device=device,
        seed=seed,
    )
    step("impute", tl.impute, sdata, model, device=device)
    model.save(out / "model.pt")

    outputs = {"zarr": str(store), "model": str(out / "model.pt")}
    unknown = [s.name for s in stack if s.name not in known]
    metrics = None
    if unknown and _has_counts(stack, unknown):
        scores = step("evaluate", tl.evaluate, sdata, sections=unknown)
        scores.to_csv(out / "metrics.csv", index=False)
        overall = scores[scores["section"] == "all"]
        metrics = {
            method: dict(zip(group["metric"], group["value"].round(4), strict=True))
            for method, group in overall.groupby("method", sort=False)
        }
        (out / "metrics.json").write_text(
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
    outputs["figures"] = step(
        "figures", _figures, sdata, model, out, library_key, metrics is not None
    )
    step("write", write_zarr, sdata, store, overwrite=overwrite)

    summary = {
        "sections": report,
        "known_sections": known,
        "n_spots": int(stack.table.n_obs),
        "n_genes": int(stack.table.n_vars),
        "seed": seed,
        "steps": timings,
        "metrics": metrics,
        "outputs": outputs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
