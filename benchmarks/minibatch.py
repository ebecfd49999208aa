"""Mini-batch against full-graph training: accuracy on her2st patient C and epoch cost by size.

1. Accuracy (``--known``, ``--seeds``): her2st patient C (C2-C6), the prepared table of
   ``benchmarks/accuracy.py`` (read from ``--cache``, never overwritten; its 3D graph is
   rebuilt here with ``gr.build_3d_graph`` defaults, and the rebuilt table written to
   ``her2st_C_minibatch.h5ad`` beside it). For each known section and seed, ``fit_asign``
   full-graph (``TrainingConfig(batch_size=None)``) and on mini-batches
   (``batch_size=--batch-size``), predicting with the networks only
   (``ArchitectureConfig(ridge_member=0)``), scored by ``tl.evaluate`` on the other
   sections (per-gene PCC, mean over sections); mean +- std over seeds.
2. Epoch cost (``--sizes``): random features (64-d, 9 tokens per level) on a 10-section
   synthetic stack with a 10-nearest-neighbour 3D graph, one known section; seconds per
   epoch of full-graph and of mini-batch training (``batch_size=2048``), and the training
   step's memory estimate. This is the measurement behind ``FULL_GRAPH_MAX_SPOTS``.

Run from the repository root (indicative timings: note the load average printed)::

    python benchmarks/minibatch.py                 # both parts
    python benchmarks/minibatch.py --skip-timing   # accuracy only

Writes ``benchmarks/results/minibatch.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path("/tmp/asign_sc_bench")
logger = logging.getLogger("minibatch")


def patient_c(cache: Path):
    """The cached prepared patient C with a freshly built default 3D graph (own copy)."""
    import anndata as ad

    from asign_sc import gr

    own = cache / "her2st_C_minibatch.h5ad"
    if own.exists():
        return ad.read_h5ad(own)
    source = cache / "her2st_C_prepared.h5ad"
    if not source.exists():
        raise SystemExit(
            f"{source} is missing: run `python benchmarks/accuracy.py --quick` once to prepare "
            "patient C (registration and features), then rerun this benchmark."
        )
    table = ad.read_h5ad(source)
    gr.build_3d_graph(table)
    table.write_h5ad(own)
    return table


def accuracy(table, known: list[str], seeds: list[int], batch_size: int, n_models: int):
    """Per-gene PCC on the unknown sections, full-graph and mini-batch, per known and seed."""
    from asign_sc import tl
    from asign_sc.models import ArchitectureConfig, TrainingConfig

    # networks only (no linear member at prediction): the comparison sees the training alone
    architecture = ArchitectureConfig(ridge_member=0)

    rows = []
    for section in known:
        unknown = [s for s in table.obs["section"].cat.categories if s != section]
        for seed in seeds:
            for mode, size in (("full-graph", None), ("mini-batch", batch_size)):
                adata = table.copy()
                start = time.perf_counter()
                model = tl.fit_asign(
                    adata,
                    known_sections=[section],
                    architecture=architecture,
                    training=TrainingConfig(batch_size=size),
                    n_models=n_models,
                    seed=seed,
                    device="cpu",
                    show_progress_bar=False,
                )
                seconds = time.perf_counter() - start
                tl.impute(adata, model, device="cpu")
                scores = tl.evaluate(adata, sections=unknown, key="asign")
                pcc = scores.query("metric == 'pcc_gene' and method == 'asign'")["value"].mean()
                epochs = int(model.history["epoch"].max()) + 1
                rows.append(
                    {
                        "known": section,
                        "seed": seed,
                        "mode": mode,
                        "pcc_gene": float(pcc),
                        "epochs": epochs,
                        "fit_s": seconds,
                    }
                )
                logger.info(
                    "%s known=%s seed=%d: PCC %.4f (%.0f s)", mode, section, seed, pcc, seconds
                )
    return pd.DataFrame(rows)


def synthetic_inputs(n_sections: int, per_section: int, *, n_genes: int = 50, seed: int = 0):
    """Random 64-d features (9 tokens per level) on a kNN 3D graph of a grid stack."""
    import scipy.sparse as sp
    import torch
    from scipy.spatial import cKDTree

    from asign_sc.models import GraphInputs
    from asign_sc.models._propagation import adjacency_tensor

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(per_section)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:per_section]
    xy = np.concatenate([grid + rng.normal(scale=0.1, size=grid.shape) for _ in range(n_sections)])
    z = np.repeat(np.arange(n_sections), per_section)
    points = np.c_[xy * 100, z * 100]
    dist, idx = cKDTree(points).query(points, k=11)
    n = len(points)
    graph = sp.csr_matrix(
        (1 / (1 + dist[:, 1:].ravel() / 100), (np.repeat(np.arange(n), 10), idx[:, 1:].ravel())),
        shape=(n, n),
    )
    adjacency = adjacency_tensor(graph.maximum(graph.T))
    rows_, cols_ = adjacency.indices()
    weights = adjacency.values()
    g = torch.Generator().manual_seed(seed)
    inputs = GraphInputs(
        spot=torch.randn(n, 64, generator=g),
        region_tokens=torch.randn(n, 9, 64, generator=g),
        global_tokens=torch.randn(n, 9, 64, generator=g),
        edge_index=torch.stack([cols_, rows_]),
        edge_weight=weights / weights.max(),
        adjacency=adjacency,
    )
    known = np.flatnonzero(z == n_sections // 2)
    targets = rng.normal(size=(len(known), n_genes)).astype(np.float32)
    return inputs, known, targets, xy


def epoch_seconds(sizes: list[int], n_sections: int = 10, repeats: int = 2) -> pd.DataFrame:
    """Seconds per training epoch, full-graph and mini-batch, for stacks of ``sizes`` spots."""
    import torch

    from asign_sc.models import ASIGNNet, TrainingConfig
    from asign_sc.models._memory import GB
    from asign_sc.models._training import TrainingPlan, split_validation

    rows = []
    for size in sizes:
        inputs, known, targets, xy = synthetic_inputs(n_sections, size // n_sections)
        rng0 = np.random.default_rng(0)
        val_pos, pool_pos = split_validation(len(known), 0.2, True, rng0)
        pool_targets = {level: targets[pool_pos] for level in ("spot", "region", "global")}
        for mode, batch_size in (("full-graph", None), ("mini-batch", 2048)):
            torch.manual_seed(0)
            net = ASIGNNet(64, 64, 64, targets.shape[1])
            plan = TrainingPlan(
                net,
                TrainingConfig(batch_size=batch_size),
                10,
                inputs,
                known,
                targets,
                pool_targets,
                pool_pos=pool_pos,
                val_pos=val_pos,
                rng=np.random.default_rng(0),
                device=torch.device("cpu"),
                batch_size=batch_size,
                tile_coords=xy[known],
            )
            plan.step()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                plan.step()
                plan.validate()
            seconds = (time.perf_counter() - start) / repeats
            estimate = plan.memory_estimate().total / GB
            rows.append(
                {"n_spots": size, "mode": mode, "epoch_s": seconds, "estimate_gb": estimate}
            )
            logger.info(
                "%d spots %s: %.2f s/epoch (estimate %.2f GB)", size, mode, seconds, estimate
            )
    return pd.DataFrame(rows)


def write_report(path: Path, acc: pd.DataFrame | None, timing: pd.DataFrame | None, args) -> None:
    load = os.getloadavg()
    lines = [
        "# Mini-batch vs full-graph training",
        "",
        f"Generated by `python benchmarks/minibatch.py{''.join(' ' + a for a in args.argv)}`",
        f"on {platform.node()} ({os.cpu_count()} CPUs), load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; timings under load are indicative.",
        "",
    ]
    if acc is not None:
        summary = acc.groupby(["known", "mode"]).agg(
            pcc_mean=("pcc_gene", "mean"),
            pcc_std=("pcc_gene", "std"),
            epochs=("epochs", "mean"),
            fit_s=("fit_s", "mean"),
        )
        lines += [
            "## her2st patient C: per-gene PCC on the unknown sections",
            "",
            f"`fit_asign(n_models={args.n_models})`, seeds {args.seeds}; mini-batch "
            f"`TrainingConfig(batch_size={args.batch_size})`.",
            "",
            summary.round(4).to_markdown(),
            "",
            "Per seed:",
            "",
            acc.round(4).to_markdown(index=False),
            "",
        ]
    if timing is not None:
        lines += [
            "## Seconds per epoch (training step(s) + validation)",
            "",
            "10 sections, one known; random 64-d features with 9 tokens per level; "
            "`hidden_dim=128`; mini-batch `batch_size=2048`.",
            "",
            timing.round(3).to_markdown(index=False),
            "",
        ]
    path.write_text("\n".join(lines))
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--known", nargs="+", default=["C2", "C4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-models", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", type=int, default=[5000, 10000, 20000, 40000])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "minibatch.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    acc = None
    if not args.skip_accuracy:
        table = patient_c(args.cache)
        acc = accuracy(table, args.known, args.seeds, args.batch_size, args.n_models)
    timing = None if args.skip_timing else epoch_seconds(args.sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, acc, timing, args)


if __name__ == "__main__":
    main()
