"""The ``asign-sc`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("asign_sc")

_EPILOG = """\
examples:
  asign-sc run --demo --out results/
      the built-in synthetic stack (4 sections with ground truth), end to end
  asign-sc run --her2st ../shared/data/her2st --patient C --known C2 --out results_c/
      a her2st-layout folder: patient C's imaged sections, C2 measured
  asign-sc run stack.zarr --known S1 --out results/
      a SpatialData zarr store that follows the stack contract (see the docs)

exit codes: 0 success, 1 invalid input data (the message says what to fix), 2 bad arguments
"""


def _parser() -> argparse.ArgumentParser:
    from asign_sc import __version__

    parser = argparse.ArgumentParser(
        prog="asign-sc",
        description="3D spatial transcriptomics from a stack of H&E sections and one measured "
        "section (ASIGN).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the pipeline on a stack and write a zarr store, figures and metrics",
        description="Load a section stack and run ASIGN on it: register the sections, embed "
        "the spot windows, build the 3D spot graph, fit the model on the known sections, "
        "impute every spot and score the imputation beside the baselines. Writes "
        "<out>/stack.zarr (SpatialData with every result), model.pt, metrics.json/.csv, "
        "PNG figures and summary.json.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("zarr", nargs="?", type=Path, help="SpatialData zarr store to read")
    source.add_argument("--demo", action="store_true", help="use the built-in synthetic stack")
    source.add_argument("--her2st", type=Path, metavar="DIR", help="her2st-layout folder")
    run.add_argument("--patient", help="patient letter for --her2st (e.g. C)")
    run.add_argument("--out", type=Path, required=True, help="output folder (created)")
    run.add_argument(
        "--known",
        nargs="+",
        metavar="SECTION",
        help="sections with measured expression (default: the first section)",
    )
    run.add_argument(
        "--library-key", default="section", help="obs column naming sections (default: section)"
    )
    run.add_argument(
        "--encoder",
        default="default",
        help="image encoder: default (EfficientNet-Lite0, ImageNet weights installed with the "
        "package), resnet50, a timm model name, or obsm:KEY for precomputed embeddings",
    )
    run.add_argument(
        "--transform",
        choices=("rigid", "affine", "syn"),
        default="rigid",
        help="registration model (default: rigid)",
    )
    run.add_argument(
        "--epochs", type=int, default=300, help="maximum training epochs (default: 300)"
    )
    run.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing <out>/stack.zarr"
    )
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asign-sc``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Progress of our own steps at INFO; other libraries (faiss reports which CPU build it
    # loads, for instance) only from WARNING, unless --verbose asks for everything.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logger.setLevel(level)
    if args.her2st is not None and args.patient is None:
        parser.error("--her2st needs --patient (e.g. --patient C)")

    from asign_sc._errors import InvalidStackError
    from asign_sc._pipeline import load_input, run_pipeline

    try:
        sdata = load_input(
            demo=args.demo, zarr=args.zarr, her2st=args.her2st, patient=args.patient, seed=args.seed
        )
        run_pipeline(
            sdata,
            out=args.out,
            known=args.known,
            library_key=args.library_key,
            encoder=args.encoder,
            transform=args.transform,
            epochs=args.epochs,
            device=args.device,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (InvalidStackError, FileNotFoundError, FileExistsError) as error:
        print(f"asign-sc: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
