"""Command-line plumbing shared by core's entry points (``python -m core.train``, ...).

A configuration error ends a command as one line ``error: <message>`` on stderr and exit status 2, never a
traceback: :class:`ArgumentParser` turns argparse's own complaints (an unknown flag, ``--epochs abc``) into
:class:`~core.errors.InputError`, and :func:`error_exit` prints any :class:`~core.errors.EnergyLensError`.
"""

from __future__ import annotations

import argparse
import sys

from .errors import EnergyLensError, InputError

__all__ = ["ArgumentParser", "error_line", "error_exit", "EXIT_USAGE"]

EXIT_USAGE = 2   # as argparse: bad command line or configuration


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors raise :class:`InputError` (message only, no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(message)


def error_line(err: BaseException) -> str:
    """The message of ``err`` as one line: ``error: <message>``."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"


def error_exit(err: EnergyLensError) -> int:
    """Print ``error: <message>`` to stderr; returns the exit status (2)."""
    print(error_line(err), file=sys.stderr, flush=True)
    return EXIT_USAGE
