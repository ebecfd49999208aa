"""Peak memory of ``tl.extract_features`` on stored (zarr) sections of growing size.

Images are read lazily, tile by tile: the memory a call adds should stay about flat as the
image grows, instead of growing with the image (a whole-level read holds the level, and its
copies, at once). For each image side, a one-section synthetic stack is written to zarr and
read back (images stay on disk as dask arrays), then ``extract_features`` runs with a small
user encoder; peak resident memory above the level before the call is sampled every 5 ms
and printed beside the size of the full-resolution image.

Run from the repository root: ``python benchmarks/features_memory.py`` (``--sizes 3072 6144
12288`` for other sides).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from features import PeakRSS  # benchmarks/features.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3072, 6144])
    parser.add_argument("--spots", type=int, default=2000)
    args = parser.parse_args()

    import spatialdata as sd
    from torch import nn

    import asign_sc as asg

    encoder = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU())
    print(f"load average at start {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"{'side px':>8s} {'image MB':>9s} {'tiles':>6s} {'seconds':>8s} {'peak +MB':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            stored = Path(folder) / f"stack_{size}.zarr"
            sdata, _ = asg.datasets.synthetic_stack(
                1, n_spots_per_section=args.spots, image_size=size, n_genes=5
            )
            sdata.write(stored)
            del sdata
            gc.collect()
            sdata = sd.read_zarr(stored)
            start = time.perf_counter()
            with PeakRSS() as memory:
                asg.tl.extract_features(
                    sdata,
                    encoder=encoder,
                    windows=(150, 350, 700),
                    window_unit="um",
                    input_size=64,
                    n_jobs=1,
                    show_progress_bar=False,
                )
            seconds = time.perf_counter() - start
            tiles = sdata.tables["table"].uns["asign"]["features"]["tiles"]
            print(
                f"{size:8d} {size * size * 3 / 1e6:9.0f} {tiles:6d} {seconds:8.1f} "
                f"{memory.delta_gb * 1e3:9.0f}"
            )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
