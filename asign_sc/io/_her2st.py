"""Reader for the her2st release layout (Andersson et al., Nat. Commun. 2021)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign_sc._allocator import reuses_freed_memory
from asign_sc._errors import InvalidStackError
from asign_sc._keys import Key
from asign_sc.io._build import SectionInput, build_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_her2st"]

logger = logging.getLogger(__name__)

#: Legacy ST arrays: spot diameter 100 um, centre-to-centre distance 200 um.
_SPOT_DIAMETER_OVER_PITCH = 100.0 / 200.0
_SPOT_PITCH_UM = 200.0
#: A section is its patient's letter(s) followed by its number: "C2".
_SECTION_NAME = re.compile(r"(?P<patient>[A-Za-z]+)(?P<number>\d+)")
_SPOT_COLUMNS = ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y")


@reuses_freed_memory
def read_her2st(
    path: str | Path,
    patient: str,
    *,
    sections: Sequence[str] | None = None,
    images: bool = True,
    coordinates: str = "pixel",
) -> SpatialData:
    """Read one patient's sections of the her2st data release as a SpatialData stack.

    Parameters
    ----------
    path
        Folder with ``counts/<section>.tsv.gz``, ``spots/<section>_selection.tsv`` and
        optionally ``images/<section>.jpg`` and ``aligned/<section>.tsv``.
    patient
        Patient letter, e.g. ``"C"``.
    sections
        Sections to read, in stacking order, e.g. ``["C2", "C3"]``. Default: every section of
        the patient that has counts; when ``images=True`` those without an image are left out
        with a logged warning. Naming a section explicitly that has no image is allowed and
        reads it without an image.
    images
        Read the H&E images (as multiscale images, decoded once). ``False`` reads counts and
        spots only.
    coordinates
        ``"pixel"``: spot centres in each section's own image pixels. ``"aligned"``: the
        authors' rigid alignment onto the patient's first section (``aligned/`` files; patients
        A, B, D), stored as ``obsm['spatial_aligned']`` in addition.

    Returns
    -------
    SpatialData with per section ``{s}_image`` and ``{s}_spots`` in coordinate system ``s``,
    and one table: raw counts in ``X`` (genes: union over sections, absent genes are zero
    counts), ``obs['section']`` ordered, ``obs['sample']`` the patient, ``obsm['spatial']``.
    """
    root = Path(path)
    if coordinates not in {"pixel", "aligned"}:
        raise ValueError(f"coordinates must be 'pixel' or 'aligned', got {coordinates!r}.")
    available = her2st_sections(root, patient)
    explicit = sections is not None
    names = list(sections) if explicit else available
    unknown = [s for s in names if s not in available]
    if unknown:
        raise InvalidStackError(
            f"Sections {unknown} have no counts file; patient {patient!r} has {available}."
        )
    if images and not explicit:
        without = [s for s in names if not (root / "images" / f"{s}.jpg").exists()]
        if without:
            logger.warning(
                "Sections %s have no image and are left out; pass sections=[...] naming them "
                "to read them without an image, or images=False.",
                without,
            )
        names = [s for s in names if s not in without]
        if not names:
            raise FileNotFoundError(f"No section of patient {patient!r} has an image.")

    def read(name: str) -> SectionInput:
        image_path = root / "images" / f"{name}.jpg"
        return _read_section(
            root,
            name,
            image_path if images and image_path.exists() else None,
            aligned=coordinates == "aligned",
        )

    # JPEG decoding and pandas' CSV parser release the GIL: sections are read on threads
    # (2 cores: 12.0 s -> 8.9 s for patient C). map() keeps the order and re-raises errors.
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        inputs = list(pool.map(read, names))
    return build_spatialdata(inputs, sample=patient)


def her2st_sections(path: str | Path, patient: str) -> list[str]:
    """Sections of one patient that have a counts file in a her2st-layout folder.

    A section belongs to patient ``P`` when its name is ``P`` followed by digits (``C2``).

    Raises
    ------
    FileNotFoundError
        ``path`` has no ``counts/`` folder, or the patient has no counts file (the message
        lists the patients there are).
    ValueError
        ``patient`` is empty or names a section rather than a patient.
    """
    root = Path(path)
    if not (root / "counts").is_dir():
        raise FileNotFoundError(
            f"{root} does not look like a her2st release: no 'counts/' folder. Pass the folder "
            "that holds counts/, spots/ and images/."
        )
    by_patient: dict[str, list[str]] = {}
    for file in (root / "counts").glob("*.tsv.gz"):
        match = _SECTION_NAME.fullmatch(file.name.removesuffix(".tsv.gz"))
        if match:
            by_patient.setdefault(match["patient"], []).append(match.string)
    patients = sorted(by_patient)
    if not isinstance(patient, str) or not patient.strip():
        raise ValueError(
            f"patient={patient!r} is empty: name one patient, e.g. patient='C' "
            f"(patients under {root / 'counts'}: {patients})."
        )
    if patient not in by_patient:
        hint = (
            f" {patient!r} looks like a section name: pass patient={match['patient']!r} and "
            f"sections=[{patient!r}]."
            if (match := _SECTION_NAME.fullmatch(patient)) and match["patient"] in by_patient
            else ""
        )
        raise FileNotFoundError(
            f"No counts for patient {patient!r} under {root / 'counts'} (patients there: "
            f"{patients}).{hint}"
        )
    return sorted(by_patient[patient], key=lambda n: (len(n), n))


def _read_table(
    path: Path, name: str, what: str, columns: Sequence[str] = (), **kwargs
) -> pd.DataFrame:
    """A tab-separated file of section ``name``; errors name the file and the section."""
    if not path.is_file():
        raise FileNotFoundError(f"Section {name!r}: {what} file {path} is missing.")
    try:
        frame = pd.read_csv(path, sep="\t", **kwargs)
    except Exception as error:  # pandas, gzip, zlib and unicode errors alike
        raise InvalidStackError(
            f"Section {name!r}: could not read {what} file {path} "
            f"({type(error).__name__}: {error}). The file may be truncated or not "
            "tab-separated; restore it from the release."
        ) from error
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise InvalidStackError(
            f"Section {name!r}: {what} file {path} lacks columns {lacking} (it has "
            f"{list(frame.columns)[:10]})."
        )
    if frame.empty:
        raise InvalidStackError(f"Section {name!r}: {what} file {path} has no rows.")
    return frame


def _read_section(root: Path, name: str, image_path: Path | None, *, aligned: bool) -> SectionInput:
    counts_path = root / "counts" / f"{name}.tsv.gz"
    spots_path = root / "spots" / f"{name}_selection.tsv"
    counts = _read_table(counts_path, name, "counts", index_col=0)
    counts.index = counts.index.astype(str)
    if not all(np.issubdtype(dtype, np.number) for dtype in counts.dtypes):
        bad = [c for c, d in counts.dtypes.items() if not np.issubdtype(d, np.number)][:3]
        raise InvalidStackError(
            f"Section {name!r}: counts file {counts_path} has non-numeric columns {bad}."
        )
    spots = _read_table(spots_path, name, "spot positions", columns=_SPOT_COLUMNS)
    if not all(np.issubdtype(spots[c].dtype, np.number) for c in _SPOT_COLUMNS) or not np.all(
        np.isfinite(spots[list(_SPOT_COLUMNS)].to_numpy(dtype=float))
    ):
        raise InvalidStackError(
            f"Section {name!r}: spot positions file {spots_path} has missing or non-numeric "
            f"values in {list(_SPOT_COLUMNS)}."
        )
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    if spots.index.has_duplicates:
        raise InvalidStackError(f"{spots_path} (section {name!r}) lists an array position twice.")
    missing = counts.index.difference(spots.index)
    if len(missing):
        logger.warning("%s: %d counted spots have no position and are dropped", name, len(missing))
    keep = counts.index.intersection(spots.index, sort=False)
    if not len(keep):
        raise InvalidStackError(
            f"Section {name!r}: no spot of counts file {counts_path} has a position in "
            f"{spots_path} (rows are matched by array position '<x>x<y>')."
        )
    counts, spots = counts.loc[keep], spots.loc[keep]

    xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
    array_xy = spots[["new_x", "new_y"]].to_numpy(dtype=float)
    pitch = _pixels_per_array_step(array_xy, xy)
    radius = 0.5 * _SPOT_DIAMETER_OVER_PITCH * pitch
    obs = pd.DataFrame(
        {Key.obs.array_col: spots["x"].to_numpy(int), Key.obs.array_row: spots["y"].to_numpy(int)},
        index=[f"{name}_{i}" for i in keep],
    )
    obsm = {}
    if aligned:
        table = root / "aligned" / f"{name}.tsv"
        if not table.exists():
            raise FileNotFoundError(
                f"coordinates='aligned' needs {table} (section {name!r}), which is missing."
            )
        warped = _read_table(
            table, name, "aligned positions", columns=("x", "y", "warped_x", "warped_y")
        )
        warped.index = (
            warped["x"].astype(int).astype(str) + "x" + warped["y"].astype(int).astype(str)
        )
        lacking = keep.difference(warped.index)
        if len(lacking):
            # The authors aligned only the spots they kept; the rest have no aligned position.
            logger.warning(
                "%s: %d spots have no aligned position in aligned/%s.tsv and are dropped",
                name,
                len(lacking),
                name,
            )
            keep = keep.intersection(warped.index, sort=False)
            counts, spots, obs = (
                counts.loc[keep],
                spots.loc[keep],
                obs.loc[[f"{name}_{i}" for i in keep]],
            )
            xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
        obsm[Key.obsm.spatial_aligned] = warped.loc[keep, ["warped_x", "warped_y"]].to_numpy(float)
    image = _read_jpeg(image_path, name) if image_path is not None else None
    return SectionInput(
        name=name,
        counts=sp.csr_matrix(counts.to_numpy(dtype=np.float32)),
        genes=counts.columns.astype(str),
        obs=obs,
        spatial=xy,
        spot_radius=radius,
        image=image,
        microns_per_pixel=_SPOT_PITCH_UM / pitch,
        obsm=obsm,
    )


def _pixels_per_array_step(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Spot pitch in pixels: least-squares affine fit of pixel on array coordinates.

    The array's two axes may be scaled slightly differently by the scanner; the geometric
    mean of the two column norms of the fitted linear map is the pitch.
    """
    design = np.c_[array_xy, np.ones(len(array_xy))]
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    linear = coef[:2]
    return float(np.sqrt(np.linalg.norm(linear[0]) * np.linalg.norm(linear[1])))


#: Serialises lifting PIL's decompression-bomb guard (a module global) across threads.
_GUARD_LOCK = threading.Lock()


def _read_jpeg(path: Path, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # her2st slides are ~9,300 x 9,900 px, beyond PIL's decompression-bomb guard, a
        # module global checked when a file is opened: lift it for this trusted file only
        # and put it back, one thread at a time (sections are read on threads).
        with _GUARD_LOCK:
            guard = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                handle = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = guard
        with handle:
            # An RGB JPEG (her2st's are) needs no convert(), which would copy the decoded
            # image once more; the array reads the decoded bytes (one copy, read-only).
            return np.asarray(handle if handle.mode == "RGB" else handle.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise InvalidStackError(
            f"Section {name!r}: could not read image {path} ({type(error).__name__}: "
            f"{error}). The file may be truncated or not a JPEG; restore it, or read the "
            "section without its image (images=False)."
        ) from error
