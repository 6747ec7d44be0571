"""``python -m core.jobs ...``: the job system's command line (core.jobs.cli), its ``sweep`` commands handed to
core.sweep's. The only module of core.jobs that imports core.sweep: a job process (``python -m core.jobs run``)
starts here too, and runners load through the canonical modules (core.jobs.child, ...), whose state they share."""

import sys

from core.jobs.cli import main
from core.sweep import cli as sweep_cli

if __name__ == "__main__":
    sys.exit(main(sweep_cli=sweep_cli))
