"""Every sirobust flag survives ``torchrun ... -m sirobust COMMAND FLAG``.

torchrun's own argparse (with ``allow_abbrev``) classifies every option-like string of the whole
command line, the script's arguments too: a string that is a prefix of several torchrun options
(``--n``: --nnodes, --nproc-per-node, ...; ``--si``: --signals-to-handle, --signals_to_handle) makes
it exit with "ambiguous option" before sirobust starts. Exact matches and strings that prefix no
torchrun option pass through its ``training_script_args`` unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys

import pytest

from sirobust.cli import build_parser

torchrun = pytest.importorskip("torch.distributed.run")


def _flags() -> list[tuple[str, str]]:
    """(command, option string) for every option of every subcommand, and of the top-level parser
    (command ``""``), from the parser the CLI itself builds."""
    parser = build_parser()
    out = [("", s) for a in parser._actions for s in a.option_strings]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        out += [(command, s) for a in p._actions for s in a.option_strings]
    return out


FLAGS = _flags()


def _torchrun_args(script_args: list[str]) -> list[str]:
    """What torchrun's parser makes of ``torchrun --nproc-per-node 2 -m sirobust SCRIPT_ARGS``; fails the
    test (with torchrun's message) where torchrun would exit."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = torchrun.get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "sirobust", *script_args])
    except SystemExit:
        pytest.fail(f"torchrun refuses {' '.join(script_args)!r}: {err.getvalue().strip()}")
    assert ns.module and ns.training_script == "sirobust"
    return ns.training_script_args


def test_every_command_and_the_renamed_flags_are_enumerated():
    commands = {c for c, _ in FLAGS}
    assert {"", "demo", "train", "evaluate", "rescale", "compare", "list"} <= commands
    by_command = {c: {f for cc, f in FLAGS if cc == c} for c in commands}
    for command in ("evaluate", "rescale", "compare"):
        assert {"-n", "--num-examples"} <= by_command[command] and "--n" not in by_command[command]
    for command in ("train", "compare"):
        assert "--with-si" in by_command[command] and "--si" not in by_command[command]


@pytest.mark.parametrize("command,flag", FLAGS, ids=[f"{c or 'sirobust'}:{f}" for c, f in FLAGS])
def test_flag_passes_through_torchrun_unchanged(command, flag):
    head = [command] if command else []
    assert _torchrun_args([*head, flag, "1"]) == [*head, flag, "1"]
    assert _torchrun_args([*head, f"{flag}=1"]) == [*head, f"{flag}=1"]


@pytest.mark.parametrize("argv,hint", [
    (["evaluate", "--weights", "w.safetensors", "--n", "5"], "-n/--num-examples"),
    (["rescale", "--model-dir", "runs/x", "--n=5"], "-n/--num-examples"),
    (["compare", "--n", "5"], "-n/--num-examples"),
    (["train", "--si"], "--with-si"),
    (["compare", "--si", "on"], "--with-si"),
])
def test_removed_flags_get_an_error_naming_their_replacement(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:  # parsing only: no command runs, whatever the parser accepts
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("sirobust: error: unrecognized arguments:") and hint in first and "torchrun" in first


def test_the_new_spellings_parse():
    p = build_parser()
    for spelled in (["-n", "7"], ["--num-examples", "7"], ["--num-examples=7"], ["-n7"]):
        assert p.parse_args(["evaluate", "--weights", "w.safetensors", *spelled]).n == 7
    assert p.parse_args(["compare", "-n", "9"]).n == 9
    assert p.parse_args(["compare", "--with-si", "on"]).si == "on"
    assert p.parse_args(["compare"]).si == "both"
    assert p.parse_args(["train", "--with-si"]).si is True
    assert p.parse_args(["train"]).si is None  # not given: --resume keeps the recorded choice


def test_python_dash_m_sirobust_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "sirobust", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: sirobust") and "evaluate" in r.stdout
