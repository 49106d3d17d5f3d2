"""Argument types and the flags several commands share (one spelling and one meaning each)."""
from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path
from typing import Sequence


def parse_number(text: str) -> float:
    """A float or a fraction such as ``8/255`` (never eval'd)."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.03 or 8/255, got {text!r}") from None


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_numbers(text: str) -> list[float]:
    return [parse_number(t) for t in parse_list(text)]


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a number (``8/255`` allowed) or a word."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. lam=6 or pairing=l2), got {text!r}")
    key, value = (t.strip() for t in text.split("=", 1))
    try:
        num = parse_number(value)
        return key, int(num) if num.is_integer() and "." not in value and "/" not in value else num
    except argparse.ArgumentTypeError:
        return key, value


def choices_type(valid: Sequence[str], what: str):
    def check(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid: {', '.join(valid)}")
        return text
    return check


def add_output_args(p: argparse.ArgumentParser, default: str, what: str, resume: bool = False) -> None:
    """``--out`` (a fresh name is chosen when it is not given and the default is taken), ``--overwrite``
    and, for commands that can continue, ``--resume``."""
    p.add_argument("--out", default=None,
                   help=f"{what} (default {default}; when that exists, the first free {default}-2, {default}-3, ...)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true",
                       help="replace what --out holds (a previous run is moved aside to a dated folder, never deleted)")
    if resume:
        group.add_argument("--resume", action="store_true",
                           help="continue the run in --out where it stopped (its recorded config must match)")


def output_path(a, default: str) -> Path:
    """The output the user named, else the default, or the first free name beside it when that is taken
    (a default never replaces anything); with --resume, the default itself."""
    from ..runfolder import fresh_name
    if a.out is not None:
        return Path(a.out)
    if getattr(a, "resume", False) or getattr(a, "overwrite", False):
        return Path(default)
    return fresh_name(default)


def run_mode(a) -> str:
    return "resume" if getattr(a, "resume", False) else "overwrite" if getattr(a, "overwrite", False) else "new"


def add_common_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they also switch off when not on a terminal)")


def optional_store_true(p: argparse.ArgumentParser, *names: str, help: str) -> None:
    """A flag whose absence is recorded as None, so --resume can tell 'not given' from 'off'."""
    p.add_argument(*names, action="store_const", const=True, default=None, help=help)


def add_data_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    """--data-dir and --accept-checksum-mismatch, the same in every command that reads a dataset."""
    p.add_argument("--data-dir", default=None,
                   help="folder that holds the dataset files; it must exist (default $SIROBUST_DATA or "
                        "~/.cache/sirobust/data, created for downloads)")
    help_ = ("use dataset files whose checksum differs from the published one (e.g. a re-compressed copy of "
             "your own); without it such a file is an error and is left untouched")
    if train:  # None when not given, so --resume keeps the recorded choice
        optional_store_true(p, "--accept-checksum-mismatch", help=help_)
    else:
        p.add_argument("--accept-checksum-mismatch", action="store_true", help=help_)
