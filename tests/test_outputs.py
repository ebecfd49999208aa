"""Output folders that are complete or absent: asign_sc._outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from asign_sc._outputs import atomic_folder, check_output_folder


def _result(folder, text):
    folder.mkdir()
    (folder / "stack.zarr").mkdir()
    (folder / "model.pt").write_text(text)
    (folder / "summary.json").write_text(text)


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_new_result_appears_only_when_complete(tmp_path):
    out = tmp_path / "run"
    with atomic_folder(out, overwrite=False) as work:
        (work / "summary.json").write_text("new")
        assert not out.exists() and work.parent == tmp_path
    assert (out / "summary.json").read_text() == "new" and not _siblings(out)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_or_stopped_run_keeps_the_previous_result(tmp_path, error):
    out = tmp_path / "run"
    _result(out, "old")
    with pytest.raises(type(error)), atomic_folder(out, overwrite=True) as work:
        (work / "model.pt").write_text("half")
        raise error
    assert (out / "model.pt").read_text() == "old" and (out / "summary.json").is_file()
    assert not _siblings(out)


def test_overwrite_replaces_every_file_of_the_previous_result(tmp_path):
    out = tmp_path / "run"
    _result(out, "old")
    (out / "sections_OLDGENE.png").write_text("stale")
    with atomic_folder(out, overwrite=True) as work:
        (work / "summary.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert not _siblings(out)


@pytest.mark.parametrize(
    ("setup", "overwrite", "match"),
    [
        (lambda out: _result(out, "old"), False, "pass --overwrite"),
        (lambda out: (out.mkdir(), (out / "stack.zarr").mkdir()), False, "incomplete result"),
        (lambda out: (out.mkdir(), (out / "thesis.docx").write_text("x")), True, "other files"),
    ],
)
def test_existing_outputs_are_never_silently_replaced(tmp_path, setup, overwrite, match):
    out = tmp_path / "run"
    setup(out)
    with pytest.raises(FileExistsError, match=match):
        check_output_folder(out, overwrite=overwrite)


def test_an_incomplete_old_result_may_be_overwritten_and_a_file_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stack.zarr").mkdir()
    check_output_folder(out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_folder(tmp_path / "file", overwrite=True)
    check_output_folder(tmp_path / "empty", overwrite=False)  # absent: fine


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_run_are_cleaned_and_the_old_result_restored(tmp_path):
    out = tmp_path / "run"
    pid = _dead_pid()
    # killed between renaming the old result aside and renaming the new one in
    _result(tmp_path / f".run.old-{pid}", "old")
    (tmp_path / f".run.tmp-{pid}").mkdir()
    alive = tmp_path / f".run.tmp-{os.getppid()}"  # another live run's folder: left alone
    alive.mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_folder(out, overwrite=False):
            pass
    assert (out / "summary.json").read_text() == "old"
    assert _siblings(out) == [alive.name]
