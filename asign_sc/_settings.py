"""Package settings: ``asign_sc.settings`` (verbosity, reuse of freed memory)."""

from __future__ import annotations

import logging
import sys
from enum import IntEnum

__all__ = ["Verbosity", "settings"]

#: The package's logger; every module logs to a child of it (``logging.getLogger(__name__)``).
LOGGER_NAME = "asign_sc"


class Verbosity(IntEnum):
    """How much the package logs: 0 errors, 1 warnings, 2 info (step summaries), 3 debug."""

    error = 0
    warning = 1
    info = 2
    debug = 3

    @property
    def level(self) -> int:
        """The :mod:`logging` level of this verbosity."""
        return _LEVELS[self]


_LEVELS = {
    Verbosity.error: logging.ERROR,
    Verbosity.warning: logging.WARNING,
    Verbosity.info: logging.INFO,
    Verbosity.debug: logging.DEBUG,
}


class _Handler(logging.StreamHandler):
    """Writes the package's records to ``stderr`` while the user has not configured logging.

    Once the root logger has a handler (``logging.basicConfig``, pytest, a CLI), records
    reach it by propagation and this handler stays silent, so no line appears twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow redirections (notebooks, contextlib.redirect_stderr)
        super().emit(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


class _Settings:
    """Settings of :mod:`asign_sc`, available as ``asign_sc.settings``."""

    def __init__(self) -> None:
        self._reuse_freed_memory = True

    @property
    def reuse_freed_memory(self) -> bool:
        """Whether the heavy steps keep freed memory in the process for reuse (Linux, glibc).

        Default ``True``: while reading, registration, features, graph, fit and imputation
        run, glibc's ``malloc`` keeps large freed blocks instead of returning each to the
        system and faulting in fresh pages for the next one; on her2st patient C the image
        features take 20-40% less time, for about 3% more peak memory. When the step ends
        the settings are restored and the free memory is returned. Set ``False`` to leave
        ``malloc`` alone (no effect on other systems).
        """
        return self._reuse_freed_memory

    @reuse_freed_memory.setter
    def reuse_freed_memory(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"reuse_freed_memory must be True or False, got {value!r}.")
        self._reuse_freed_memory = value

    @property
    def verbosity(self) -> Verbosity:
        """How much is logged: 0 ``"error"``, 1 ``"warning"``, 2 ``"info"``, 3 ``"debug"``.

        Default: ``"info"`` in a notebook or IPython session, where each step's summary line
        (what it added to the table) is shown; otherwise the level your :mod:`logging`
        configuration gives the ``"asign_sc"`` logger (``"warning"`` without one). Setting
        it sets the level of the ``"asign_sc"`` logger. Lines go to ``stderr`` until you
        configure logging yourself (``logging.basicConfig``); then your handlers print them.
        """
        level = logging.getLogger(LOGGER_NAME).getEffectiveLevel()
        for verbosity in sorted(Verbosity, reverse=True):
            if level <= verbosity.level:
                return verbosity
        return Verbosity.error

    @verbosity.setter
    def verbosity(self, value: int | str | Verbosity) -> None:
        logging.getLogger(LOGGER_NAME).setLevel(_parse(value).level)

    def __repr__(self) -> str:
        return (
            f"asign_sc.settings(verbosity={self.verbosity.name!r}, "
            f"reuse_freed_memory={self.reuse_freed_memory})"
        )


def _parse(value: int | str | Verbosity) -> Verbosity:
    if isinstance(value, str):
        try:
            return Verbosity[value.lower()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return Verbosity(value)
        except ValueError:
            pass
    choices = ", ".join(f"{v.value} or {v.name!r}" for v in Verbosity)
    raise ValueError(f"verbosity must be one of {choices}; got {value!r}.")


def _in_ipython() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None


def _install() -> None:
    """Attach the handler once; INFO by default in IPython/Jupyter unless a level is set."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        logger.addHandler(_Handler())
    if logger.level == logging.NOTSET and _in_ipython():
        logger.setLevel(logging.INFO)


settings = _Settings()
_install()
