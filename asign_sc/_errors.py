"""Exceptions raised by asign_sc."""

from __future__ import annotations

__all__ = ["InvalidStackError"]


class InvalidStackError(ValueError):
    """The input does not describe a valid section stack.

    The message always says what is wrong and how to fix it.
    """
