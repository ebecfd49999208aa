"""asign_sc.settings.verbosity and the package's log handler."""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager

import pytest

import asign_sc as asc
from asign_sc import _settings


@pytest.fixture
def package_logger():
    """The "asign_sc" logger, its level restored afterwards."""
    logger = logging.getLogger("asign_sc")
    level = logger.level
    yield logger
    logger.setLevel(level)


@contextmanager
def no_root_handlers():
    """Logging as a user who never configured it (pytest's own root handlers set aside)."""
    root = logging.getLogger()
    saved, root.handlers = root.handlers, []
    try:
        yield root
    finally:
        root.handlers = saved


@pytest.mark.parametrize(
    ("value", "level"),
    [(0, logging.ERROR), ("warning", logging.WARNING), (2, logging.INFO), ("DEBUG", logging.DEBUG)],
)
def test_verbosity_takes_ints_and_names(package_logger, value, level):
    asc.settings.verbosity = value
    assert package_logger.level == level
    assert asc.settings.verbosity.level == level
    assert int(asc.settings.verbosity) == [logging.ERROR, logging.WARNING, logging.INFO,
                                           logging.DEBUG].index(level)  # fmt: skip


@pytest.mark.parametrize("value", [4, "loud", True, 1.5])
def test_bad_verbosity_is_refused(package_logger, value):
    with pytest.raises(ValueError, match="verbosity must be one of 0 or 'error'"):
        asc.settings.verbosity = value


def test_info_lines_reach_stderr_once_without_logging_config(package_logger, capsys):
    log = logging.getLogger("asign_sc.tl._impute")
    with no_root_handlers():
        asc.settings.verbosity = "info"
        log.info("added layers['asign']")
        log.debug("hidden at info")
        first = capsys.readouterr().err
        asc.settings.verbosity = "warning"
        log.info("hidden at warning")
        log.warning("careful")
        second = capsys.readouterr().err
    assert first == "added layers['asign']\n"
    assert second == "WARNING: careful\n"


def test_users_logging_config_prints_each_line_once(package_logger, capsys):
    stream = io.StringIO()
    with no_root_handlers() as root:
        root.addHandler(logging.StreamHandler(stream))  # what logging.basicConfig does
        asc.settings.verbosity = 2
        logging.getLogger("asign_sc.gr").info("built the graph")
    assert stream.getvalue() == "built the graph\n"
    assert capsys.readouterr().err == ""  # our handler stays silent: no duplicate line


def test_info_by_default_in_ipython_only(package_logger, monkeypatch):
    package_logger.setLevel(logging.NOTSET)
    monkeypatch.setattr(_settings, "_in_ipython", lambda: False)
    _settings._install()
    assert package_logger.level == logging.NOTSET  # follows the user's logging config
    monkeypatch.setattr(_settings, "_in_ipython", lambda: True)
    _settings._install()
    assert asc.settings.verbosity == _settings.Verbosity.info
    handlers = [h for h in package_logger.handlers if isinstance(h, _settings._Handler)]
    assert len(handlers) == 1  # installing twice adds no second handler
    package_logger.setLevel(logging.ERROR)
    _settings._install()  # a level the user chose is kept
    assert asc.settings.verbosity == _settings.Verbosity.error
