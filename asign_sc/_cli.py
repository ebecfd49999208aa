"""The ``asign-sc`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

  asign-sc run stack.zarr --known S1 --out results/ --scheduler tcp://10.0.0.5:8786 --devices 2
      a batch job: image tiles as tasks on a running Dask scheduler, training on 2 devices;
      follow it with  tail -f results.log

exit codes: 0 success, 1 invalid input data (the message says what to fix), 2 bad arguments,
  130 stopped (Ctrl-C or SIGTERM). --out gets a complete result or stays as it was.
progress: timestamped lines per step in <out>.log beside the output folder (appended, flushed
  as they happen, kept when a run fails); a complete result holds a copy (<out>/asign-sc.log).
"""

#: How long ``--scheduler`` waits for the Dask scheduler to answer.
SCHEDULER_TIMEOUT = "20s"


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
        "<out>/stack.zarr (SpatialData with every result), model/ (the fitted model), "
        "metrics.json/.csv, PNG figures and summary.json.",
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
        help="image encoder: default (EfficientNet-Lite0's stages 4-6, ImageNet weights "
        "installed with the package), resnet50, a timm model name, or obsm:KEY for "
        "precomputed embeddings",
    )
    run.add_argument(
        "--stain-normalization",
        choices=("none", "macenko"),
        default="none",
        help="map every section's H&E stain onto one reference before the encoder: macenko, "
        "or none (default: none)",
    )
    run.add_argument(
        "--add-view",
        action="append",
        default=[],
        metavar="ENCODER[:STAIN]",
        help="embed the windows once more with ENCODER (STAIN: macenko or none), fit one more "
        "model on those features and average the models (a feature-view ensemble; repeatable). "
        "Measured best on her2st: --stain-normalization macenko --add-view efficientnet_lite2 "
        "(3.5 times the feature time, 2.3 times the fit time)",
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
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="train on N devices with torch.distributed (N processes: CPU or one GPU each; "
        "default: 1)",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786): image tiles, and "
        "section pairs where supported, run as tasks on its workers",
    )
    run.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="progress log, appended and flushed line by line (default: <out>.log beside --out)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the result of an earlier run in --out (only once the new one is complete)",
    )
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asign-sc``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Progress of our own steps at INFO; other libraries (faiss reports which CPU build it
    # loads, for instance) only from WARNING, unless --verbose asks for everything.
    console = logging.StreamHandler()
    console.setLevel(level)  # --quiet quiets the terminal, never the log file
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[console],
    )
    logger.setLevel(min(level, logging.INFO))
    _check_arguments(parser, args)
    client = _connect_scheduler(parser, args.scheduler)

    from asign_sc._errors import InvalidStackError
    from asign_sc._pipeline import check_encoder, check_known, load_input, run_pipeline

    log_file = args.log if args.log is not None else args.out.parent / f"{args.out.name}.log"
    try:
        progress = _log_to_file(log_file, verbose=args.verbose)
        log_offset = log_file.stat().st_size  # where this run's lines start
    except OSError as error:
        if client is not None:
            client.close()
        parser.error(f"--log {log_file}: cannot write the progress log there ({error})")
    logger.info("asign-sc run started: %s", " ".join(sys.argv[1:] if argv is None else argv))
    if client is not None:
        workers = client.scheduler_info().get("workers", {})
        logger.info("connected to the Dask scheduler %s (%d workers)", args.scheduler, len(workers))
    previous = _stop_on_sigterm()
    try:
        sdata = load_input(
            demo=args.demo, zarr=args.zarr, her2st=args.her2st, patient=args.patient, seed=args.seed
        )
        try:
            check_encoder(sdata, args.encoder)
            check_known(sdata, args.known, args.library_key)
        except ValueError as error:
            parser.error(str(error))
        run_pipeline(
            sdata,
            out=args.out,
            known=args.known,
            library_key=args.library_key,
            encoder=args.encoder,
            stain_normalization=_stain(args.stain_normalization),
            extra_views=args.views,
            transform=args.transform,
            epochs=args.epochs,
            device=args.device,
            devices=args.devices,
            client=client,
            seed=args.seed,
            overwrite=args.overwrite,
            log_file=log_file,
            log_offset=log_offset,
            show_progress_bar=not args.quiet,
        )
        logger.info("run complete: %s", args.out)
    except (InvalidStackError, FileNotFoundError, FileExistsError) as error:
        _log_only(progress, f"run failed: {error}")
        print(f"asign-sc: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _log_only(progress, f"run stopped; {args.out} is as it was before")
        print(
            f"asign-sc: stopped; nothing was written ({args.out} is as it was before).",
            file=sys.stderr,
        )
        return 130
    except SystemExit as error:
        _log_only(progress, f"run stopped: bad arguments (exit {error.code}), see the terminal")
        raise
    except BaseException as error:
        _log_only(progress, f"run failed: {type(error).__name__}: {error}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if client is not None:
            client.close()
        logger.removeHandler(progress)
        progress.close()
    return 0


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no data, before any work: ``parser.error`` (exit 2) on failure."""
    from asign_sc._outputs import check_output_folder

    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    if args.scheduler is not None and not args.scheduler.strip():
        parser.error("--scheduler is empty; give the scheduler's address, e.g. tcp://host:8786")
    if not args.library_key.strip():
        parser.error("--library-key is empty; name the obs column of sections (e.g. section)")
    if args.encoder.lower().startswith("obsm:") and not args.encoder[5:]:
        parser.error("--encoder obsm: needs a key, e.g. --encoder obsm:X_uni")
    if args.patient is not None and args.her2st is None:
        parser.error("--patient applies to --her2st only")
    if args.her2st is not None:
        from asign_sc.io._her2st import her2st_sections

        if args.patient is None:
            parser.error("--her2st needs --patient (e.g. --patient C)")
        try:
            her2st_sections(args.her2st, args.patient)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error).replace("patient=", "--patient "))
    if args.zarr is not None:
        from asign_sc._pipeline import check_zarr_store

        try:
            check_zarr_store(args.zarr)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
    try:
        check_output_folder(args.out, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as error:
        parser.error(str(error))
    from asign_sc._utils import resolve_device

    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--device: {error}")
    from asign_sc._pipeline import check_views
    from asign_sc.models.encoders import get_encoder

    try:
        args.views = check_views(args.add_view, args.encoder, _stain(args.stain_normalization))
    except ValueError as error:
        parser.error(str(error))
    encoders = [("--encoder", args.encoder)] * (not args.encoder.lower().startswith("obsm:"))
    for option, name in encoders + [("--add-view", v.encoder) for v in args.views]:
        try:
            get_encoder(name)
        except (ValueError, TypeError, KeyError, ImportError, OSError, RuntimeError) as error:
            parser.error(f"{option} {name}: {error}")


def _stain(choice: str) -> str | None:
    """``--stain-normalization`` as ``extract_features`` takes it (``None`` for none)."""
    return None if choice == "none" else choice


def _connect_scheduler(parser: argparse.ArgumentParser, address: str | None) -> Any:
    """A ``dask.distributed.Client`` of the scheduler at ``address``; exit 2 if unreachable."""
    if address is None:
        return None
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        parser.error("--scheduler needs dask.distributed: pip install distributed")
    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, ValueError, TypeError) as error:
        parser.error(
            f"--scheduler {address}: no Dask scheduler answered within {SCHEDULER_TIMEOUT} "
            f"({type(error).__name__}: {error}). Check the address (tcp://host:port, as "
            "printed by dask scheduler or cluster.scheduler_address) and that it is running."
        )
    return client


def _log_to_file(path: Path, *, verbose: bool) -> logging.Handler:
    """Append our progress to ``path``: timestamped lines, flushed one by one (``tail -f``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # flushes every record
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
    )
    logger.addHandler(handler)
    return handler


def _log_only(handler: logging.Handler, message: str) -> None:
    """An error line for the log file alone (the terminal gets its own message)."""
    record = logging.makeLogRecord(
        {"name": logger.name, "levelno": logging.ERROR, "levelname": "ERROR", "msg": message}
    )
    handler.handle(record)


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM into KeyboardInterrupt, so a stopped run cleans up its partial output."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
