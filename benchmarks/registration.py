"""Benchmark of tl.register_sections: time per section pair and accuracy.

1. her2st patient C (C2-C6, ~9,300 x 9,900 px images): seconds per pair and in total,
   tissue-mask Dice before/after per pair and with the reference section.
2. Synthetic stacks (asign_sc.datasets.synthetic_stack, large rotations, every second
   section mirrored) at several image sizes: spot-position error in full-resolution pixels
   against the known transforms, for sections cut almost at the same depth (the transforms
   are identifiable) and further apart (neighbours differ, as real sections do). Baselines
   measured in the same run: no registration, and the initialisation alone (keypoints or
   moments, before ANTs).

Run from the repository root (2 threads, as on a shared laptop):

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 OMP_NUM_THREADS=2 python benchmarks/registration.py
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pandas as pd

from asign_sc._stack import resolve_stack
from asign_sc.tl import register_sections
from asign_sc.tl._registration import _compose, _initialise, _pairs, _prepare

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def her2st(path: Path) -> None:
    from asign_sc.io import read_her2st

    start = time.perf_counter()
    sdata = read_her2st(path, patient="C")
    read_s = time.perf_counter() - start
    table = sdata.tables["table"]
    radius = resolve_stack(sdata)["C4"].spot_radius
    columns = [
        "target",
        "path",
        "n_inliers",
        "rotation_deg",
        "dice_before",
        "dice_init",
        "dice_after",
        "dice_reference_before",
        "dice_reference_after",
        "ncc_before",
        "ncc_after",
        "seconds",
    ]
    print(f"\nread {read_s:.1f} s")
    # the default, then the former default (max_side=1000) as the baseline, in the same run
    runs = {}
    for label, kwargs in (("default", {}), ("max_side=1000", {"max_side": 1000})):
        wall, cpu = time.perf_counter(), _cpu()
        register_sections(sdata, show_progress_bar=False, **kwargs)
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        record = table.uns["asign_registration"]
        qc = record["qc"]
        moved = qc["path"] != "reference"
        per_pair = qc.loc[moved, "seconds"].mean()
        runs[label] = (wall, per_pair, table.obsm["spatial_aligned"].copy())
        print(
            f"\n== her2st patient C ({label}: working long side {record['params']['max_side']} px;"
            " reference C4, rigid) =="
        )
        print(qc[columns].round(3).to_string())
        print(
            f"registration {wall:.1f} s wall, {cpu:.1f} s CPU, {per_pair:.1f} s per pair "
            f"(wall); min tissue Dice after: pairs {qc.loc[moved, 'dice_after'].min():.3f}, "
            f"with C4 {qc.loc[moved, 'dice_reference_after'].min():.3f} "
            f"(before: {qc.loc[moved, 'dice_reference_before'].min():.3f})"
        )
    (wall, per_pair, aligned), (base_wall, base_pair, base_aligned) = runs.values()
    shift = np.linalg.norm(aligned - base_aligned, axis=1)
    print(
        f"\ndefault vs max_side=1000: {base_wall / wall:.2f}x faster in total, "
        f"{base_pair / per_pair:.2f}x per pair; spot centres differ by median "
        f"{np.median(shift):.1f} px, max {shift.max():.1f} px (spot radius {radius:.1f} px)"
    )


def _errors(sdata, truth, matrices: dict[str, np.ndarray], reference: str) -> float:
    """Mean spot-position error (full-resolution px) of ``matrices`` over moved sections."""
    errors = []
    for section in resolve_stack(sdata):
        if section.name == reference:
            continue
        xy = np.c_[section.spatial, np.ones(section.n_spots)]
        expected = (
            xy @ (np.linalg.inv(truth.transforms[reference]) @ truth.transforms[section.name]).T
        )
        errors.append(np.linalg.norm(xy @ matrices[section.name].T - expected, axis=1))
    return float(np.concatenate(errors).mean())


def synthetic(sizes: list[int], spacings: list[float], n_sections: int, seeds: list[int]) -> None:
    from asign_sc.datasets import synthetic_stack

    rows = []
    for size in sizes:
        for spacing in spacings:
            for seed in seeds:
                sdata, truth = synthetic_stack(
                    n_sections,
                    image_size=size,
                    n_spots_per_section=150,
                    n_genes=5,
                    flip=True,
                    section_spacing=spacing,
                    seed=seed,
                )
                stack = resolve_stack(sdata)
                names = stack.names
                reference = names[len(names) // 2]
                # baseline: the initialisation alone (no ANTs)
                prepared = {n: _prepare(stack, n, min(size, 1000), "grey") for n in names}
                init = {reference: np.eye(3)}
                for moving, target in _pairs(names, reference):
                    chosen, _ = _initialise(
                        prepared[moving],
                        prepared[target],
                        init="keypoints",
                        allow_flip=True,
                        min_inliers=10,
                        keypoint_max_side=400,
                        seed=0,
                    )
                    init[moving] = chosen.matrix
                init = _compose({None: names}, {None: reference}, init)
                wall = time.perf_counter()
                register_sections(sdata, max_side=min(size, 1000), show_progress_bar=False)
                wall = time.perf_counter() - wall
                record = sdata.tables["table"].uns["asign_registration"]
                matrices = {k: np.asarray(v) for k, v in record["matrices"].items()}
                qc = record["qc"]
                moved = qc["path"] != "reference"
                flips_ok = all(
                    qc.loc[n, "flipped"] == (truth.flipped[n] != truth.flipped[reference])
                    for n in names
                )
                rows.append(
                    {
                        "size": size,
                        "spacing": spacing,
                        "seed": seed,
                        "err_none": _errors(sdata, truth, {n: np.eye(3) for n in names}, reference),
                        "err_init": _errors(sdata, truth, init, reference),
                        "err_after": _errors(sdata, truth, matrices, reference),
                        "flips_ok": flips_ok,
                        "paths": ",".join(sorted(set(qc.loc[moved, "path"]))),
                        "s_per_pair": wall / int(moved.sum()),
                    }
                )
    table = pd.DataFrame(rows)
    table["after/init"] = table["err_after"] / table["err_init"]
    print(
        f"\n== synthetic stacks ({n_sections} sections, rotations up to 180 deg, every second "
        "section mirrored): mean spot error in full-resolution px =="
    )
    print(table.round(3).to_string(index=False))
    print("image side = full resolution here; spacing = section distance / tissue radius")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--her2st", type=Path, default=HER2ST)
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--spacings", type=float, nargs="+", default=[0.01, 0.12])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-sections", type=int, default=3)
    args = parser.parse_args()
    print(
        "threads: ITK",
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"],
        "OMP",
        os.environ["OMP_NUM_THREADS"],
    )
    synthetic(args.sizes, args.spacings, args.n_sections, args.seeds)
    if not args.skip_her2st:
        if (args.her2st / "counts").is_dir():
            her2st(args.her2st)
        else:
            print(f"\nher2st data not found at {args.her2st}; skipped (pass --her2st PATH).")


if __name__ == "__main__":
    main()
