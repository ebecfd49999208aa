"""The end-to-end pipeline behind ``asign-sc run``."""

from __future__ import annotations

import json
import logging
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
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate a stack, run the available pipeline steps and write the results to ``out``.

    Writes ``out/stack.zarr`` (the SpatialData with every result) and ``out/summary.json``
    (the stack report and the steps that ran). Returns the summary.
    """
    out = Path(out)
    store = out / "stack.zarr"
    if store.exists() and not overwrite:
        raise FileExistsError(f"{store} exists; pass --overwrite to replace it.")
    stack = resolve_stack(sdata, library_key=library_key, min_sections=2)
    known = list(known) if known else [stack.names[0]]
    for name in known:
        stack[name]  # raises a clear error for an unknown section name
    rows = np.concatenate([stack[name].rows for name in known])
    validate_counts(stack.table, rows=rows)

    report = stack_report(stack, known)
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
    if not any(s.has_image for s in stack):
        raise InvalidStackError("No section has an image; asign-sc run needs the H&E images.")

    out.mkdir(parents=True, exist_ok=True)
    write_zarr(sdata, store, overwrite=overwrite)
    summary = {
        "sections": report,
        "known_sections": known,
        "n_spots": int(stack.table.n_obs),
        "n_genes": int(stack.table.n_vars),
        "seed": seed,
        "steps": ["validate"],
        "outputs": {"zarr": str(store)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s and %s", store, out / "summary.json")
    return summary


def write_zarr(sdata: SpatialData, path: Path, *, overwrite: bool = False) -> None:
    """Write a SpatialData zarr store, without zarr's notice about future sharding defaults."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
        sdata.write(path, overwrite=overwrite)
