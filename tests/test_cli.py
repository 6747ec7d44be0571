"""One command line, ``python -m core train|jobs|sweep|evaluate``, built from the config dataclasses' metadata:
every training option has help text and its choices; budgets and steps take fractions like 8/255 everywhere."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import core.__main__ as core_main
from core.cli import parse_fraction
from core.errors import InputError
from core.losses import METHODS
from core.models import ARCHITECTURES
from core.train import TrainConfig, build_parser, config_from_args, main

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_train_option_has_help_and_the_registries_choices():
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in actions, f.name
        assert f.metadata.get("help") and actions[f.name].help.strip(), f"--{f.name} has no help text"
    assert tuple(actions["method"].choices) == tuple(METHODS)
    assert all(a in actions["arch"].help for a in ARCHITECTURES)
    assert "npz:<path>" in actions["dataset"].help
    assert "[default: 10]" in actions["epochs"].help


def test_fractions_are_accepted_for_budgets_and_steps(tmp_path):
    cfg = config_from_args(["--eps", "8/255", "--step-size", "2/255"])
    assert cfg.eps == pytest.approx(8 / 255) and cfg.step_size == pytest.approx(2 / 255)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"eps": "16/255", "step_size": "0.01"}))
    cfg = config_from_args(["--config", str(f)])
    assert cfg.eps == pytest.approx(16 / 255) and cfg.step_size == pytest.approx(0.01)
    assert TrainConfig.from_dict({"eps": "4/255"}).eps == pytest.approx(4 / 255)
    with pytest.raises(InputError, match="eps must be a number or a fraction"):
        TrainConfig.from_dict({"eps": "8/25x"})
    with pytest.raises(InputError, match="--eps"):
        config_from_args(["--eps", "eight"])
    assert parse_fraction("1/0.5") == 2.0
    with pytest.raises(InputError, match="step"):
        parse_fraction("1/0", "step")


def test_bad_values_end_in_one_error_line(capsys):
    assert main(["--method", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --method: invalid choice: 'nope'")
    assert main(["--eps", "8/25x"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --eps")


def test_core_help_lists_the_four_commands(capsys):
    assert core_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "jobs", "sweep", "evaluate"):
        assert f"\n  {cmd} " in out
    assert core_main.main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'nope'")


def test_the_entry_points_and_their_aliases_run():
    p = _run("-m", "core", "--help")
    assert p.returncode == 0 and "evaluate" in p.stdout
    for args, prog in ((["-m", "core", "train", "--help"], "python -m core train"),
                       (["-m", "core.train", "--help"], "python -m core.train"),
                       (["-m", "core", "evaluate", "--help"], "python -m core evaluate"),
                       (["-m", "core.evaluation", "--help"], "python -m core.evaluation"),
                       (["-m", "core", "sweep", "--help"], "sweep"),
                       (["-m", "core.sweep_cli", "--help"], "sweep"),
                       (["-m", "core", "jobs", "--help"], "python -m core.jobs"),
                       (["-m", "core.jobs", "--help"], "python -m core.jobs")):
        p = _run(*args)
        assert p.returncode == 0, (args, p.stderr)
        assert p.stdout.startswith(f"usage: {prog}") or prog in p.stdout.splitlines()[0], (args, p.stdout[:200])
    p = _run("-m", "core", "train", "--eps", "8/255", "--epochs", "0")
    assert p.returncode == 2 and p.stderr.strip() == "error: epochs must be a positive integer, got 0"


def test_evaluate_command_checks_its_options(tmp_path, capsys):
    from core import evaluation

    assert evaluation.main(["--out-dir", str(tmp_path / "e"), "--norm", "L3"]) == 2
    assert "invalid choice: 'L3'" in capsys.readouterr().err
    assert evaluation.main(["--out-dir", str(tmp_path / "e"), "--eps", "8/255"]) == 2
    assert "needs a model" in capsys.readouterr().err
