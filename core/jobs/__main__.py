"""``python -m core.jobs ...``: the job system's command line (core.jobs.cli). Its ``sweep`` commands are
core.sweep's: they are loaded by name, as job runners are (``module:function`` from job.json), so that nothing in
core.jobs imports the layers above it. A job process (``python -m core.jobs run``) starts here too."""

import importlib
import sys

from core.jobs.cli import main

SWEEP_CLI = "core.sweep_cli:cli"   # the sweep commands, above the job system


def _sweep_cli(*args, **kwargs) -> int:
    module, name = SWEEP_CLI.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main(sweep_cli=_sweep_cli))
