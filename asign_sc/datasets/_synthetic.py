"""A synthetic section stack cut from one simulated 3D tissue, with its ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage

from asign_sc._keys import Key
from asign_sc.io._build import SectionInput, build_spatialdata

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["SyntheticTruth", "synthetic_stack"]

#: Tissue types: name, eosin (background) RGB, nuclei per 1000 px^2, nucleus radius in px
#: at image_size=768, haematoxylin RGB. Colour and texture differ visibly between types.
_TISSUE_TYPES = (
    ("tumour", (205, 130, 185), 9.0, 3.2, (75, 40, 120)),
    ("stroma", (236, 160, 190), 2.2, 2.2, (110, 60, 140)),
    ("immune", (215, 150, 200), 16.0, 2.0, (55, 30, 105)),
    ("adipose", (246, 228, 236), 0.6, 2.0, (120, 80, 150)),
    ("necrosis", (225, 175, 205), 5.0, 1.2, (150, 110, 170)),
    ("gland", (226, 140, 175), 6.0, 2.8, (90, 55, 135)),
)
_BACKGROUND = np.array([242.0, 240.0, 244.0])
#: Image rows rendered at once, and the rows of the final blur (sigma 0.6, truncated at 4
#: sigma: 2 px) each band reads beyond its edges.
_BAND = 128
_BLUR_HALO = 2
#: ST arrays: spot diameter 100 um at a 200 um pitch.
_SPOT_PITCH_UM = 200.0


@dataclass(frozen=True)
class SyntheticTruth:
    """Ground truth of :func:`synthetic_stack`.

    Attributes
    ----------
    transforms
        Per section, the 3x3 matrix mapping the section's pixel ``(x, y, 1)`` to the common
        tissue frame (pixels, origin at the tissue's centre). Registration recovers these up
        to the choice of reference section.
    flipped
        Per section, whether it lies mirrored on its slide.
    section_z
        Depth of each section in the tissue volume (pixels).
    expression
        Noise-free mean counts per spot and gene (before library-size variation).
    tissue_type
        Majority tissue type under each spot.
    tissue_xy
        Spot centres in the tissue frame.
    """

    transforms: dict[str, np.ndarray]
    flipped: dict[str, bool]
    section_z: dict[str, float]
    expression: pd.DataFrame
    tissue_type: pd.Series
    tissue_xy: np.ndarray


class _Volume:
    """The simulated 3D tissue: an outline, tissue types and gene programs as smooth fields."""

    def __init__(
        self,
        rng: np.random.Generator,
        radius: float,
        n_types: int,
        n_genes: int,
        genes_rng: np.random.Generator | None = None,
    ):
        self.radius = radius
        self.n_types = n_types
        # Tissue types: argmax of smooth random fields (a few low-frequency cosines each).
        self.type_waves = [self._waves(rng, 5, radius * 0.9) for _ in range(n_types)]
        # Outline: a lobed disc whose lobes turn slowly with depth, so no section is symmetric.
        self.lobes = rng.uniform(0.05, 0.1, size=3) * np.array([1.0, 0.8, 0.6])
        self.lobe_phase = rng.uniform(0, 2 * np.pi, size=3)
        # Genes: a type program (log-fold changes) plus smooth gradients for some genes.
        genes_rng = rng if genes_rng is None else genes_rng
        self.base = genes_rng.lognormal(mean=0.5, sigma=0.9, size=n_genes)
        program = genes_rng.normal(0.0, 0.35, size=(n_types, n_genes))
        self.gene_kind = np.full(n_genes, "housekeeping", dtype=object)
        marker_genes = genes_rng.permutation(n_genes)
        per_type = max(1, n_genes // (2 * n_types))
        for t in range(n_types):
            markers = marker_genes[t * per_type : (t + 1) * per_type]
            program[t, markers] += genes_rng.uniform(1.2, 2.2, size=len(markers))
            self.gene_kind[markers] = _TISSUE_TYPES[t][0]
        gradient = marker_genes[n_types * per_type : n_types * per_type + max(1, n_genes // 6)]
        self.gene_kind[gradient] = "gradient"
        self.gradient_genes = gradient
        self.gradient_waves = [self._waves(rng, 2, radius * 1.6) for _ in gradient]
        self.program = program

    @staticmethod
    def _waves(rng: np.random.Generator, n: int, wavelength: float) -> tuple[np.ndarray, ...]:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = direction * (2 * np.pi / (wavelength * rng.uniform(0.7, 1.3, size=(n, 1))))
        return k, rng.uniform(0, 2 * np.pi, size=n), rng.uniform(0.5, 1.0, size=n)

    @staticmethod
    def _field(waves: tuple[np.ndarray, ...], xyz: np.ndarray) -> np.ndarray:
        k, phase, amplitude = waves
        return np.cos(xyz @ k.T + phase) @ amplitude

    def margin(self, xyz: np.ndarray) -> np.ndarray:
        """Signed distance-like margin to the outline (pixels): positive inside the tissue."""
        angle = np.arctan2(xyz[:, 1], xyz[:, 0])
        z = xyz[:, 2] / self.radius
        wobble = sum(
            amp * np.sin((i + 2) * angle + phase + 0.8 * z)
            for i, (amp, phase) in enumerate(zip(self.lobes, self.lobe_phase, strict=True))
        )
        return self.radius * (1 + wobble) - np.hypot(xyz[:, 0], xyz[:, 1])

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        return self.margin(xyz) >= 0

    def tissue_type(self, xyz: np.ndarray) -> np.ndarray:
        return np.argmax(np.stack([self._field(w, xyz) for w in self.type_waves], axis=1), axis=1)

    def log_mean(self, xyz: np.ndarray) -> np.ndarray:
        types = self.tissue_type(xyz)
        out = np.log(self.base)[None, :] + self.program[types]
        for gene, waves in zip(self.gradient_genes, self.gradient_waves, strict=True):
            out[:, gene] += 0.9 * self._field(waves, xyz) / waves[2].sum()
        return out


def synthetic_stack(
    n_sections: int = 4,
    *,
    n_spots_per_section: int = 150,
    image_size: int = 768,
    n_genes: int = 50,
    n_tissue_types: int = 4,
    max_rotation: float = 180.0,
    flip: bool | str = False,
    section_spacing: float = 0.12,
    seed: int = 0,
    programs_seed: int | None = None,
) -> tuple[SpatialData, SyntheticTruth]:
    """Simulate a stack of adjacent sections with H&E-like images and spot counts.

    One 3D tissue volume (a lobed outline, tissue types as smooth random regions, gene
    programs per type plus smooth spatial gradients) is cut into ``n_sections`` parallel
    sections. Each section lies on its own slide at a random rotation and offset (and,
    optionally, mirrored); a regular grid of spots (legacy ST geometry: diameter half the
    pitch) is laid on the slide and the spots over tissue are kept. Counts are negative
    binomial around the mean expression averaged over each spot's disc.

    Parameters
    ----------
    n_sections
        Number of sections.
    n_spots_per_section
        Approximate number of spots over tissue per section; sets the spot pitch.
    image_size
        Side of each (square) slide image in pixels.
    n_genes
        Number of genes.
    n_tissue_types
        Number of tissue types (at most 6), each with its own look and gene program.
    max_rotation
        Rotations are drawn uniformly from ``[-max_rotation, max_rotation]`` degrees.
    flip
        ``True``: mirror every second section; ``"random"``: mirror each with probability
        1/2; ``False``: no mirrored sections.
    section_spacing
        Distance between consecutive sections as a fraction of the tissue radius; larger
        values make neighbouring sections differ more.
    seed
        Seed of every random draw; the same seed gives the same stack.
    programs_seed
        Seed of the gene programs alone (each type's expression profile and its marker
        genes). Stacks with different ``seed`` and the same ``programs_seed`` are different
        tumours of one disease: their shapes, tissue layouts and gradients differ, the
        expression of each tissue type is shared (a cohort). ``None``: drawn from ``seed``.

    Returns
    -------
    The SpatialData (sections ``S1``, ``S2``, ...) and its :class:`SyntheticTruth`.
    """
    if n_sections < 1:
        raise ValueError(f"n_sections must be at least 1, got {n_sections}.")
    if not 1 <= n_tissue_types <= len(_TISSUE_TYPES):
        raise ValueError(f"n_tissue_types must be between 1 and {len(_TISSUE_TYPES)}.")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 px, got {image_size}.")
    if flip not in (True, False, "random"):
        raise ValueError(f"flip must be True, False or 'random', got {flip!r}.")
    rng = np.random.default_rng(seed)
    radius = 0.32 * image_size
    genes_rng = None if programs_seed is None else np.random.default_rng(programs_seed)
    volume = _Volume(rng, radius, n_tissue_types, n_genes, genes_rng)
    pitch = float(np.sqrt(np.pi * radius**2 / max(n_spots_per_section, 1)))
    microns_per_pixel = _SPOT_PITCH_UM / pitch
    genes = pd.Index([f"Gene{i:03d}" for i in range(n_genes)])

    inputs, transforms, flipped, depth = [], {}, {}, {}
    expression, types, tissue_xy = [], [], []
    for index in range(n_sections):
        name = f"S{index + 1}"
        z = (index - (n_sections - 1) / 2) * section_spacing * radius
        mirror = bool(index % 2) if flip is True else bool(flip == "random" and rng.random() < 0.5)
        angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
        centre = image_size / 2 + rng.uniform(-0.06, 0.06, size=2) * image_size
        to_tissue = _slide_to_tissue(angle, centre, mirror)
        spots_px = _spot_grid(rng, image_size, pitch)
        spots_xyz = _with_z(_apply(to_tissue, spots_px), z)
        on_tissue = volume.inside(spots_xyz)
        spots_px, spots_xyz = spots_px[on_tissue], spots_xyz[on_tissue]
        spot_radius = pitch / 4
        log_mean = np.log(
            np.mean(
                [
                    np.exp(volume.log_mean(spots_xyz + offset))
                    for offset in _disc_offsets(spot_radius)
                ],
                axis=0,
            )
        )
        mean = np.exp(log_mean)
        library = rng.lognormal(0.0, 0.25, size=(len(mean), 1))
        counts = _negative_binomial(rng, mean * library, dispersion=4.0)

        inputs.append(
            SectionInput(
                name=name,
                counts=counts,
                genes=genes,
                obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(len(spots_px))]),
                spatial=spots_px,
                spot_radius=spot_radius,
                image=_render(rng, volume, to_tissue, z, image_size),
                microns_per_pixel=microns_per_pixel,
            )
        )
        transforms[name], flipped[name], depth[name] = to_tissue, mirror, z
        expression.append(pd.DataFrame(mean, index=inputs[-1].obs.index, columns=genes))
        types.append(volume.tissue_type(spots_xyz))
        tissue_xy.append(spots_xyz[:, :2])

    sdata = build_spatialdata(inputs)
    table = sdata.tables[Key.sdata.table]
    table.var["program"] = pd.Categorical(volume.gene_kind)
    type_names = [t[0] for t in _TISSUE_TYPES[:n_tissue_types]]
    truth = SyntheticTruth(
        transforms=transforms,
        flipped=flipped,
        section_z=depth,
        expression=pd.concat(expression),
        tissue_type=pd.Series(
            pd.Categorical.from_codes(np.concatenate(types), categories=type_names),
            index=table.obs_names,
            name="tissue_type",
        ),
        tissue_xy=np.vstack(tissue_xy),
    )
    return sdata, truth


def _slide_to_tissue(angle: float, centre: np.ndarray, mirror: bool) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([-1.0 if mirror else 1.0, 1.0])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = -linear @ centre
    return matrix


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _with_z(xy: np.ndarray, z: float) -> np.ndarray:
    return np.c_[xy, np.full(len(xy), z)]


def _spot_grid(rng: np.random.Generator, size: int, pitch: float) -> np.ndarray:
    offset = rng.uniform(0, pitch, size=2)
    xs = np.arange(offset[0], size, pitch)
    ys = np.arange(offset[1], size, pitch)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    margin = pitch / 2
    keep = np.all((grid >= margin) & (grid < size - margin), axis=1)
    return grid[keep]


def _disc_offsets(radius: float) -> list[np.ndarray]:
    """Centre and six points at half the radius: the spot's disc average of expression."""
    angles = np.arange(6) * np.pi / 3
    points = [np.zeros(3)] + [np.array([np.cos(a), np.sin(a), 0.0]) * radius / 2 for a in angles]
    return points


def _negative_binomial(rng: np.random.Generator, mean: np.ndarray, dispersion: float) -> np.ndarray:
    p = dispersion / (dispersion + mean)
    return rng.negative_binomial(dispersion, p).astype(np.float32)


def _render(
    rng: np.random.Generator, volume: _Volume, to_tissue: np.ndarray, z: float, size: int
) -> np.ndarray:
    """H&E-like image: eosin background per tissue type, haematoxylin nuclei, texture."""
    scale = size / 768
    inside, types = _tissue_maps(volume, to_tissue, z, size)

    # Nuclei: a Poisson process thinned by each type's density, drawn as blurred discs.
    density = np.array([t[2] for t in _TISSUE_TYPES]) / 1000 / scale**2
    candidates = rng.uniform(0, size, size=(rng.poisson(density.max() * size * size), 2))
    cy, cx = candidates[:, 1].astype(int), candidates[:, 0].astype(int)
    keep = inside[cy, cx] & (rng.random(len(candidates)) < density[types[cy, cx]] / density.max())
    nuclei = np.zeros((size, size))
    nuclear_radius = np.array([t[3] for t in _TISSUE_TYPES]) * scale
    sigma = 1.4 * scale
    weight = (nuclear_radius[types[cy[keep], cx[keep]]] / nuclear_radius.mean()) ** 2
    np.add.at(nuclei, (cy[keep], cx[keep]), weight * 2 * np.pi * sigma**2)
    # A lone nucleus peaks at ~1 after the blur; overlapping ones saturate.
    nuclei = np.clip(0.9 * ndimage.gaussian_filter(nuclei, sigma=sigma), 0, 1)[..., None]
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=2.5 * scale)
    peak = np.abs(texture).max() + 1e-9
    eosin_rgb = np.array([t[1] for t in _TISSUE_TYPES], dtype=float)
    haem_rgb = np.array([t[4] for t in _TISSUE_TYPES], dtype=float)
    # Colour, blur and noise band by band (a few MB each instead of several 200 MB arrays at
    # 3k px); the blur reads _BLUR_HALO rows beyond each band, so every pixel gets the same
    # numbers as with the whole image, and the noise is drawn in the same (row) order.
    image = np.empty((size, size, 3), dtype=np.uint8)
    for start in range(0, size, _BAND):
        stop = min(start + _BAND, size)
        lo, hi = max(start - _BLUR_HALO, 0), min(stop + _BLUR_HALO, size)
        band_types, band_nuclei = types[lo:hi], nuclei[lo:hi]
        band_texture = 1 + 0.6 * texture[lo:hi, :, None] / peak * 0.15
        tissue = (
            eosin_rgb[band_types] * (1 - band_nuclei) + haem_rgb[band_types] * band_nuclei
        ) * band_texture
        band = np.where(inside[lo:hi, :, None], tissue, _BACKGROUND)
        band = ndimage.gaussian_filter(band, sigma=(0.6, 0.6, 0))[start - lo : stop - lo]
        band = band + rng.normal(0, 3, band.shape)
        image[start:stop] = np.clip(band, 0, 255).astype(np.uint8)
    return image


def _tissue_maps(
    volume: _Volume, to_tissue: np.ndarray, z: float, size: int, step: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask and type per pixel.

    The fields are smooth over tens of pixels, so they are evaluated on a grid ``step``
    pixels apart and interpolated linearly: the same picture at a fraction of the cost.
    Linear interpolation is a convex combination of a cell's four corners, so a cell whose
    corners agree (same winning type, same side of the outline, by a margin far above
    rounding) takes their answer for all its pixels; only the pixels of the other cells, along
    type and tissue boundaries, are interpolated (with the same call, so the same numbers).
    """
    coarse = np.arange(0, size + step, step, dtype=float) + 0.5
    xs, ys = np.meshgrid(coarse, coarse)
    xyz = _with_z(_apply(to_tissue, np.c_[xs.ravel(), ys.ravel()]), z)
    fields = np.stack([volume._field(w, xyz).reshape(xs.shape) for w in volume.type_waves])
    # The margin interpolates smoothly, unlike a mask.
    margin = volume.margin(xyz).reshape(xs.shape)

    n_cells = -(-size // step)  # cells holding pixels; their corners are grid nodes 0..n_cells
    corners = (slice(0, n_cells), slice(1, n_cells + 1))
    winner = np.argmax(fields, axis=0)
    ordered = np.sort(fields, axis=0)
    lead = ordered[-1] - ordered[-2] if len(fields) > 1 else np.full(winner.shape, np.inf)
    # The decision margin of each corner, scaled to the fields' magnitude.
    tol = 1e-9 * (1.0 + np.abs(fields).max())
    cell_type, type_sure = winner[0:n_cells, 0:n_cells], np.ones((n_cells, n_cells), bool)
    cell_inside = margin[0:n_cells, 0:n_cells] > 0
    inside_sure = np.ones((n_cells, n_cells), bool)
    tol_margin = 1e-9 * (1.0 + np.abs(margin).max())
    for rows in corners:
        for cols in corners:
            type_sure &= (winner[rows, cols] == cell_type) & (lead[rows, cols] > tol)
            inside_sure &= (margin[rows, cols] > tol_margin) == cell_inside
            inside_sure &= np.abs(margin[rows, cols]) > tol_margin

    def per_pixel(cells: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(cells, step, axis=0), step, axis=1)[:size, :size]

    types = per_pixel(cell_type).astype(np.intp)
    inside = per_pixel(cell_inside)
    fine = np.arange(size, dtype=float) / step
    unsure_type = np.nonzero(~per_pixel(type_sure))
    if len(unsure_type[0]):
        coords = [fine[unsure_type[0]], fine[unsure_type[1]]]
        values = [ndimage.map_coordinates(f, coords, order=1) for f in fields]
        types[unsure_type] = np.argmax(np.stack(values), axis=0)
    unsure_inside = np.nonzero(~per_pixel(inside_sure))
    if len(unsure_inside[0]):
        coords = [fine[unsure_inside[0]], fine[unsure_inside[1]]]
        inside[unsure_inside] = ndimage.map_coordinates(margin, coords, order=1) >= 0
    return inside, types
