"""Command-line plumbing shared by core's entry points (``python -m core.train``, ...).

A configuration error ends a command as one line ``error: <message>`` on stderr and exit status 2, never a
traceback: :class:`ArgumentParser` turns argparse's own complaints (an unknown flag, ``--epochs abc``) into
:class:`~core.errors.InputError`, and :func:`error_exit` prints any :class:`~core.errors.EnergyLensError`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from .errors import EnergyLensError, InputError

__all__ = ["ArgumentParser", "error_line", "error_exit", "EXIT_USAGE", "parse_fraction", "FRACTION"]

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


FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_fraction(value, what: str = "value") -> float:
    """A budget or step as written by people: a number (``0.03``) or a fraction (``8/255``), from the command line
    or a config file. InputError naming ``what`` when it is neither."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    m = FRACTION.match(text)
    try:
        out = float(m.group(1)) / float(m.group(2)) if m else float(text)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"{what} must be a number or a fraction like 8/255, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return out
