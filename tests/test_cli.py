"""The asign-sc command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asign_sc._cli import main


def test_help_reads_like_a_tool(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "asign-sc run --demo --out results/" in text and "exit codes" in text


def test_demo_run_writes_store_and_summary(tmp_path):
    assert main(["run", "--demo", "--out", str(tmp_path), "-q"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["section"] for s in summary["sections"]] == ["S1", "S2", "S3", "S4"]
    assert summary["known_sections"] == ["S1"]
    assert (tmp_path / "stack.zarr").is_dir()
    # a second run refuses to overwrite, with exit code 1 and a message
    assert main(["run", "--demo", "--out", str(tmp_path), "-q"]) == 1


def test_zarr_input_and_bad_section(tmp_path, capsys):
    assert main(["run", "--demo", "--out", str(tmp_path / "a"), "-q"]) == 0
    store = tmp_path / "a" / "stack.zarr"
    assert main(["run", str(store), "--known", "S2", "--out", str(tmp_path / "b"), "-q"]) == 0
    assert main(["run", str(store), "--known", "S7", "--out", str(tmp_path / "c"), "-q"]) == 1
    assert "Unknown section 'S7'" in capsys.readouterr().err


def test_argument_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--her2st", str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "asign_sc._cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("asign-sc ")
