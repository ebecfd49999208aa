"""Output folders that appear complete or not at all (``asign-sc run --out``).

A run writes into a temporary folder beside ``--out`` (``.<out>.tmp-<pid>``) and renames it
into place only when everything is written. With ``overwrite=True`` the previous result is
renamed aside (``.<out>.old-<pid>``), the new one renamed in and only then the old one
deleted. A run that fails or is stopped removes its temporary folder, so ``--out`` holds
either the previous complete result or nothing, never a mix of two runs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RESULT_MARKER", "atomic_folder", "check_output_folder"]

logger = logging.getLogger(__name__)

#: Written last by a run; a folder with it is a complete result.
RESULT_MARKER = "summary.json"
_STORE = "stack.zarr"


def check_output_folder(out: Path, *, overwrite: bool) -> None:
    """Check, before any work, that a run may write its result to ``out``.

    Raises
    ------
    NotADirectoryError
        ``out`` is a file.
    FileExistsError
        ``out`` holds a result (complete, or incomplete from an interrupted run of an older
        version) and ``overwrite`` is false, or it holds other files, which are never
        replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; name a folder to create.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    complete = (out / RESULT_MARKER).is_file()
    partial = (out / _STORE).exists() and not complete
    if not (complete or partial):
        raise FileExistsError(
            f"--out {out} is a folder with other files (no {_STORE} or {RESULT_MARKER} of an "
            "asign-sc run); choose a new folder: nothing in it is ever replaced."
        )
    if overwrite:
        return
    if partial:
        raise FileExistsError(
            f"--out {out} holds an incomplete result ({_STORE} without {RESULT_MARKER}: a run "
            "of an older version was stopped while writing). Delete it, or pass --overwrite "
            "to replace it."
        )
    raise FileExistsError(
        f"--out {out} holds the result of an earlier run; pass --overwrite to replace it "
        "(it is kept until the new result is complete), or choose another --out."
    )


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder to write into; move it to ``out`` only when the block ends.

    If the block raises (including ``KeyboardInterrupt``), the temporary folder is deleted and
    ``out`` is left as it was.
    """
    out = Path(out)
    _recover_stale(out)
    check_output_folder(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = _sibling(out, "tmp", os.getpid())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _sibling(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid}"


def _move_into_place(work: Path, out: Path) -> None:
    if not out.exists():
        os.replace(work, out)
        return
    old = _sibling(out, "old", os.getpid())
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("replaced the previous result in %s", out)


def _recover_stale(out: Path) -> None:
    """Clean up after runs that were killed outright (SIGKILL, power loss).

    Their temporary folders are deleted; a previous result renamed aside but not replaced
    (the run died between the two renames) is put back.
    """
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)")
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            os.replace(path, out)
            logger.warning("restored the previous result %s from an interrupted run", out)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run", path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier call in this process) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
