"""Benchmark of ``tl.extract_features(client=...)``: 2 single-threaded Dask workers vs 1.

A 4-section synthetic stack (``datasets.synthetic_stack``) is embedded three ways in one
run: in this process with one torch thread, on a ``LocalCluster`` of 1 worker process and on
one of 2 worker processes (1 thread each). Each cluster call is timed after a warm-up call
on the same cluster (worker start-up, imports and the first encoder build are not what a
long job pays per tile). The script checks that every run gives the in-process features and
prints the speed-up of 2 workers over 1, with the load average before and after each
timing: on a shared machine, other work on the cores lowers the speed-up, and the load
average says how much.

Run from the repository root: ``python benchmarks/dask_features.py`` (``--help`` for
options; ``--encoder conv`` uses a small user ``torch.nn.Module`` instead of the default
EfficientNet-Lite0).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def load() -> str:
    """The 1-minute load average and the CPU count, for the printout."""
    return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def small_conv():
    """A cheap user encoder: two strided convolutions, 32-d feature maps."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU()
    )


def features(sdata) -> dict[str, np.ndarray]:
    table = sdata.tables["table"]
    return {k: np.asarray(table.obsm[k]).copy() for k in table.obsm if k.startswith("X_asign")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", choices=("default", "conv"), default="default")
    parser.add_argument("--spots", type=int, default=150, help="spots per section")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    import asign_sc as asg

    sdata, _ = asg.datasets.synthetic_stack(
        4, n_spots_per_section=args.spots, image_size=args.image_size, seed=0
    )
    encoder = small_conv() if args.encoder == "conv" else "default"
    kwargs = {
        "encoder": encoder,
        "windows": (150, 350, 700),
        "window_unit": "um",
        "batch_size": args.batch_size,
        "precision": "float32",
        "n_jobs": 1,
        "show_progress_bar": False,
    }
    n_obs = sdata.tables["table"].n_obs
    print(
        f"4 sections, {n_obs} spots, {args.image_size} px images, encoder {args.encoder}, "
        f"torch {torch.__version__}; load average at start {load()}"
    )

    before = load()
    start = time.perf_counter()
    asg.tl.extract_features(sdata, **kwargs)
    in_process = time.perf_counter() - start
    reference = features(sdata)
    tiles = sdata.tables["table"].uns["asign"]["features"]["tiles"]
    print(f"in-process, 1 thread: {in_process:6.1f} s  ({tiles} tiles; load {before} -> {load()})")

    seconds = {}
    for n_workers in (1, 2):
        with (
            LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            asg.tl.extract_features(sdata, client=client, **kwargs)  # warm-up
            before = load()
            start = time.perf_counter()
            asg.tl.extract_features(sdata, client=client, **kwargs)
            seconds[n_workers] = time.perf_counter() - start
        same = all(np.array_equal(features(sdata)[k], v) for k, v in reference.items())
        print(
            f"{n_workers} worker(s) x 1 thread: {seconds[n_workers]:6.1f} s  "
            f"(equal to in-process: {same}; load {before} -> {load()})"
        )
    print(
        f"speed-up 2 workers / 1 worker: {seconds[1] / seconds[2]:.2f}x; "
        f"1 worker / in-process: {in_process / seconds[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
