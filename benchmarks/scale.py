"""Scale benchmark: the whole pipeline on growing synthetic stacks, step by step.

1. End to end on ``asign_sc.datasets.synthetic_stack`` (``--n-sections`` sections of
   ``--sizes`` spots each, ``--image-size`` px images, ``--n-genes`` genes): simulate,
   register (``tl.register_sections``), features (``tl.extract_features``), 3D graph
   (``gr.build_3d_graph``), fit (``tl.fit_asign`` on section S1), impute (``tl.impute``) and
   write (``SpatialData.write`` to zarr). Features run with a cheap user ``torch.nn.Module``
   encoder at every size and with the default encoder (EfficientNet-Lite0) up to
   ``--default-encoder-max`` spots per section, so the feature cost and the rest are seen
   apart (the rest of the pipeline runs on the cheap encoder's features).
2. Graph, fit and impute only, on a plain AnnData without images (random features in
   ``obsm``, spot centres of ``--n-sections`` jittered grids, counts from a smooth field) at
   ``--graph-sizes`` spots in all: the growth of the model steps with the number of spots.

Per step: wall seconds, the peak resident memory of the process during the step (sampled
every 5 ms) and its rise above the level at the step's start, and the growth exponent
``log(t2 / t1) / log(n2 / n1)`` between consecutive sizes (n = spots in the stack). Each size
runs in a fresh process, so one size's memory does not carry into the next. The report
(``--out``, default ``benchmarks/results/scale.md``) records the machine, the load average
at the start and end, and the command.

Run from the repository root (``--threads 2`` on an idle 2-core machine; the default of 1
thread suits a shared one):

    python benchmarks/scale.py --sizes 1000 5000 20000 --graph-sizes 10000 50000 200000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from features import PeakRSS  # noqa: E402  (benchmarks/features.py)

OUT = ROOT / "benchmarks" / "results" / "scale.md"
#: Window sides (micrometres) of the synthetic stacks' spot, region and global levels.
WINDOWS_UM = (150, 350, 700)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000, 20000])
    parser.add_argument("--n-sections", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=3072)
    parser.add_argument("--n-genes", type=int, default=250)
    parser.add_argument(
        "--default-encoder-max",
        type=int,
        default=5000,
        help="largest spots per section that also get the default encoder (0: never)",
    )
    parser.add_argument("--graph-sizes", type=int, nargs="*", default=[10000, 50000, 200000])
    parser.add_argument("--feature-dim", type=int, default=64, help="of the random features")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--n-models", type=int, default=1)
    parser.add_argument(
        "--batch-size",
        default="auto",
        help="TrainingConfig(batch_size=): 'auto', 'none' (full graph) or spots per batch",
    )
    parser.add_argument(
        "--num-neighbors",
        default="10",
        help="TrainingConfig(num_neighbors=): sampled in-edges per spot in mini-batches, or "
        "'none' (exact closures)",
    )
    parser.add_argument(
        "--max-section-gap",
        type=int,
        default=None,
        help="gr.build_3d_graph(max_section_gap=): link sections at most this far apart",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch, ITK and OpenMP threads")
    parser.add_argument(
        "--in-process", action="store_true", help="run every size in this process (tests)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    return parser


# -- one size ------------------------------------------------------------------------------
class _Steps:
    """Times and peak memory of named steps, in order."""

    def __init__(self, part: str, size: int):
        self.part, self.size, self.rows, self.failed = part, size, [], False

    def run(self, step: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, timed; a step that raises is recorded with its error
        (the report shows it) and the steps after it are skipped."""
        if self.failed:
            return None
        start = time.perf_counter()
        row = {"part": self.part, "size": self.size, "step": step, "error": ""}
        out = None
        with PeakRSS() as memory:
            try:
                out = fn(*args, **kwargs)
            except Exception as error:  # reported in the table, not hidden
                row["error"], self.failed = f"{type(error).__name__}: {error}", True
        row.update(
            seconds=time.perf_counter() - start,
            peak_rss_gb=memory.peak / 1e9,
            rise_gb=memory.delta_gb,
        )
        self.rows.append(row)
        return out


def _training(batch_size: str, num_neighbors: str):
    from asign_sc.models import TrainingConfig

    def parse(value: str) -> int | str | None:
        value = value.lower()
        return value if value == "auto" else None if value == "none" else int(value)

    return TrainingConfig(batch_size=parse(batch_size), num_neighbors=parse(num_neighbors))


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def end_to_end(size: int, options: dict) -> list[dict]:
    """Every step on a synthetic stack of ``n_sections x size`` spots."""
    _set_threads(options["threads"])
    from torch import nn

    import asign_sc as asg
    from asign_sc._pipeline import write_zarr

    steps = _Steps("end to end", size)
    sdata, _ = steps.run(
        "simulate",
        asg.datasets.synthetic_stack,
        options["n_sections"],
        n_spots_per_section=size,
        image_size=options["image_size"],
        n_genes=options["n_genes"],
    )
    n_obs = sdata.tables["table"].n_obs
    steps.run("register", asg.tl.register_sections, sdata, show_progress_bar=False)
    feature_options = {
        "windows": WINDOWS_UM,
        "window_unit": "um",
        "n_jobs": options["threads"],
        "show_progress_bar": False,
    }
    if 0 < size <= options["default_encoder_max"]:
        steps.run(
            "features (default encoder)",
            asg.tl.extract_features,
            sdata,
            key_added="asign_default",
            **feature_options,
        )
    # a cheap user encoder: one strided convolution, 8 channels
    encoder = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())
    steps.run(
        "features (user encoder)",
        asg.tl.extract_features,
        sdata,
        encoder=encoder,
        input_size=64,
        **feature_options,
    )
    _model_steps(steps, sdata, options, spatial_key="spatial_aligned", spot_radius=None)
    with tempfile.TemporaryDirectory(prefix="asign_scale_") as folder:
        # as `asign-sc run` writes it (without zarr's notice about sharding defaults)
        steps.run("write zarr", write_zarr, sdata, Path(folder) / "stack.zarr")
    for row in steps.rows:
        row["n_obs"] = n_obs
    return steps.rows


def _model_steps(steps: _Steps, data, options: dict, *, spatial_key: str, spot_radius) -> None:
    import asign_sc as asg

    steps.run(
        "graph",
        asg.gr.build_3d_graph,
        data,
        spatial_key=spatial_key,
        spot_radius=spot_radius,
        max_section_gap=options["max_section_gap"],
        n_jobs=options["threads"],
    )
    model = steps.run(
        "fit",
        asg.tl.fit_asign,
        data,
        known_sections=["S1"],
        n_models=options["n_models"],
        epochs=options["epochs"],
        training=_training(options["batch_size"], options["num_neighbors"]),
        device=options["device"],
        show_progress_bar=False,
    )
    if model is not None:
        _add_epoch_row(steps, model.history)
    steps.run("impute", asg.tl.impute, data, model, device=options["device"])


def _add_epoch_row(steps: _Steps, history) -> None:
    """Epochs run on the fit row; a row for one epoch (median wall time) after it.

    Early stopping ends a fit after a number of epochs that depends on the data, so the
    fit's total time mixes the cost of an epoch with how long training takes to converge;
    the epoch row's growth exponent is the cost alone.
    """
    fit = steps.rows[-1]
    fit["epochs"] = len(history)
    steps.rows.append(
        {
            "part": steps.part,
            "size": steps.size,
            "step": "fit, one epoch (median)",
            "error": "",
            "seconds": float(history["seconds"].median()),
            "peak_rss_gb": None,
            "rise_gb": None,
        }
    )


def plain_stack(n_obs: int, n_sections: int, n_genes: int, feature_dim: int, seed: int = 0):
    """A plain AnnData of ``n_obs`` spots: jittered grids, smooth-field counts, random features.

    Sections ``S1``, ``S2``, ...; spot pitch 200 px, radius 50 px (legacy ST geometry);
    ``obsm``: ``spatial`` (= ``spatial_aligned``), and features under the ``asign`` keys of
    :func:`asign_sc.tl.extract_features`: per level a 3 x 3 grid of ``feature_dim`` tokens
    (float16, as stored by it) and their mean (the pooled vector, float32).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    per_section = math.ceil(n_obs / n_sections)
    side = math.ceil(math.sqrt(per_section))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    grid = grid[:per_section] * 200.0
    xy = np.concatenate([grid + rng.normal(scale=10, size=grid.shape) for _ in range(n_sections)])
    xy = xy[:n_obs]
    names = [f"S{s + 1}" for s in range(n_sections)]
    sections = np.repeat(names, per_section)[:n_obs]
    # expression: a few smooth bumps over the array, the same in every section
    centres = rng.uniform(0, side * 200, size=(6, 2))
    loadings = rng.normal(scale=0.8, size=(6, n_genes))
    field = np.exp(-((xy[:, None] - centres[None]) ** 2).sum(-1) / (2 * (side * 40.0) ** 2))
    counts = rng.poisson(np.exp(0.5 + field @ loadings)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                "section": pd.Categorical(
                    sections, categories=[f"S{s + 1}" for s in range(n_sections)]
                )
            },
            index=[f"spot{i}" for i in range(n_obs)],
        ),
        var=pd.DataFrame(index=[f"Gene{j:03d}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy
    adata.obsm["spatial_aligned"] = xy
    for level in ("spot", "region", "global"):
        tokens = rng.normal(size=(n_obs, 9, feature_dim)).astype(np.float16)
        adata.obsm[f"X_asign_{level}"] = tokens.mean(axis=1, dtype=np.float32)
        adata.obsm[f"X_asign_{level}_tokens"] = tokens
    return adata


def model_only(size: int, options: dict) -> list[dict]:
    """Graph, fit, impute and write on a plain AnnData of ``size`` spots."""
    _set_threads(options["threads"])
    steps = _Steps("graph, fit, impute", size)
    adata = steps.run(
        "simulate",
        plain_stack,
        size,
        options["n_sections"],
        options["n_genes"],
        options["feature_dim"],
    )
    _model_steps(steps, adata, options, spatial_key="spatial", spot_radius=50.0)
    with tempfile.TemporaryDirectory(prefix="asign_scale_") as folder:
        steps.run("write zarr", adata.write_zarr, Path(folder) / "stack.zarr")
    for row in steps.rows:
        row["n_obs"] = adata.n_obs
    return steps.rows


# -- driver and report -----------------------------------------------------------------------
def _run(fn, size: int, options: dict, in_process: bool) -> list[dict]:
    if in_process:
        return fn(size, options)
    # a fresh process per size: peak memory of one size does not carry into the next
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, size, options).result()


def _machine() -> list[str]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"- machine: {platform.platform()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, GPU: {gpu}",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
    ]


def _exponents(rows: list[dict]) -> dict[tuple[str, str, int], float]:
    """log(t2/t1)/log(n2/n1) of each step between consecutive sizes of its part."""
    out = {}
    by_step: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_step.setdefault((row["part"], row["step"]), []).append(row)
    for (part, step), runs in by_step.items():
        runs = sorted((r for r in runs if not r.get("error")), key=lambda r: r["n_obs"])
        for small, large in itertools.pairwise(runs):
            if small["n_obs"] == large["n_obs"] or min(small["seconds"], large["seconds"]) <= 0:
                continue
            out[(part, step, large["size"])] = math.log(
                large["seconds"] / small["seconds"]
            ) / math.log(large["n_obs"] / small["n_obs"])
    return out


def _table(rows: list[dict], exponents: dict) -> list[str]:
    lines = [
        "| spots | step | seconds | peak RSS (GB) | rise (GB) | growth exponent |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        exponent = exponents.get((row["part"], row["step"], row["size"]))
        if row.get("error"):
            lines.append(f"| {row['n_obs']:,} | {row['step']} | failed: {row['error']} | | | |")
            continue
        step = f"{row['step']} ({row['epochs']} epochs)" if row.get("epochs") else row["step"]
        memory = (
            "| |"
            if row["peak_rss_gb"] is None
            else f"{row['peak_rss_gb']:.2f} | {row['rise_gb']:.2f} |"
        )
        lines.append(
            f"| {row['n_obs']:,} | {step} | {row['seconds']:.1f} | {memory} "
            f"{'' if exponent is None else f'{exponent:.2f}'} |"
        )
    return lines


def report(rows: list[dict], options: dict, load: tuple[float, float], argv: list[str]) -> str:
    """The markdown report of a run."""
    exponents = _exponents(rows)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Scale benchmark",
        "",
        f"Generated by `python benchmarks/scale.py {' '.join(argv)}` on {now}.",
        "",
        *_machine(),
        f"- threads: {options['threads']} (torch, ITK, OpenMP); device: {options['device']}",
        f"- load average (1 min): {load[0]:.2f} at the start, {load[1]:.2f} at the end "
        "(timings on a loaded machine are indicative only)",
        "",
        "Seconds are wall time; peak RSS is the largest resident memory of the process "
        "during the step (sampled every 5 ms), rise is that peak minus the memory at the "
        "step's start. The growth exponent of a step is log(t2/t1)/log(n2/n1) from the "
        "previous size (n = spots in the stack). Early stopping ends a fit after a number "
        "of epochs that depends on the data (in brackets); 'fit, one epoch' is the median "
        "wall time of its epochs (a training pass and validation), the cost without that "
        "number.",
    ]
    intros = {
        "end to end": (
            "End to end: synthetic stacks",
            f"`synthetic_stack({options['n_sections']}, n_spots_per_section=N, "
            f"image_size={options['image_size']}, n_genes={options['n_genes']})`; features "
            f"with windows {WINDOWS_UM} um, the default encoder up to "
            f"{options['default_encoder_max']} spots per section and a user encoder "
            "(`Conv2d(3, 8, 8, stride=8)` + ReLU, 64 px input) at every size; graph "
            f"(`build_3d_graph(max_section_gap={options['max_section_gap']})`), fit "
            "and impute on the user encoder's features; fit: "
            f"`fit_asign(known_sections=['S1'], n_models={options['n_models']}, "
            f"epochs={options['epochs']}, training=TrainingConfig(batch_size="
            f"{options['batch_size']!r}, num_neighbors={options['num_neighbors']}))`.",
        ),
        "graph, fit, impute": (
            "Graph, fit and impute: plain AnnData",
            f"{options['n_sections']} sections of jittered grids (pitch 200 px, radius 50 px), "
            f"{options['n_genes']} genes, random {options['feature_dim']}-d features and 3 x 3 "
            "token grids in obsm; same fit settings. Target: graph, fit and impute grow at "
            "most as n^1.2.",
        ),
    }
    for part, (title, intro) in intros.items():
        part_rows = [row for row in rows if row["part"] == part]
        if part_rows:
            lines += ["", f"## {title}", "", intro, "", *_table(part_rows, exponents)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, write the report, return the per-step rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    for variable in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # inherited by the size processes
    options = {
        key: getattr(args, key)
        for key in (
            "n_sections",
            "image_size",
            "n_genes",
            "default_encoder_max",
            "feature_dim",
            "epochs",
            "n_models",
            "batch_size",
            "num_neighbors",
            "max_section_gap",
            "device",
            "threads",
        )
    }
    load_start = os.getloadavg()[0]
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(rows, options, (load_start, load_start), argv)
    for fn, sizes in ((end_to_end, args.sizes), (model_only, args.graph_sizes)):
        for size in sizes:
            rows += _run(fn, size, options, args.in_process)
            print(f"{fn.__name__} {size}: {rows[-1]['n_obs']:,} spots done", flush=True)
            # the report so far after every size: a long run stopped early keeps its numbers
            text = report(rows, options, (load_start, os.getloadavg()[0]), argv)
            args.out.write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
