"""``python -m core <command> ...``: EnergyLens's one command line.

* ``train``     train a model in the foreground (core.train; also ``python -m core.train``)
* ``jobs``      background jobs: submit, list, stop, logs (core.jobs; also ``python -m core.jobs``)
* ``sweep``     grids of training runs and their Table 1 (core.sweep_cli; also ``python -m core.sweep_cli``)
* ``evaluate``  natural / PGD / AutoAttack accuracy of one model (core.evaluation; also ``python -m core.evaluation``)

``python -m core <command> --help`` lists a command's options.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it does); modules are imported only when their command runs (each pulls in torch & co.)
COMMANDS = {
    "train": ("core.train", "train a model in the foreground (every TrainConfig option)"),
    "jobs": ("core.jobs.__main__", "background jobs: submit, list, status, stop, logs, run"),
    "sweep": ("core.sweep_cli", "sweeps: submit a grid of runs, list, status, Table 1, stop"),
    "evaluate": ("core.evaluation", "natural / PGD / AutoAttack accuracy of one model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m core {" + ",".join(COMMANDS) + "} ...", "", "EnergyLens command line.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "python -m core <command> --help lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}': choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    prog = f"python -m core {name}"
    if name == "train":
        return module.main(rest, prog=prog)
    if name == "evaluate":
        return module.main(rest, prog=prog)
    if name == "sweep":
        return module.cli(rest)
    return module.main(rest, sweep_cli=module._sweep_cli)   # jobs


if __name__ == "__main__":
    sys.exit(main())
