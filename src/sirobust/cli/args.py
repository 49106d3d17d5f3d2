"""Argument types and the flags several commands share (one spelling and one meaning each).

Every type here checks its value with :mod:`sirobust.checks`, the same layer the
Python API uses, so a bad flag fails at parse time, before any work, with a
message that names the flag and the allowed values.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

from .. import checks


# Flags given up because torchrun cannot pass them on: its launcher parses the whole command line,
# `torchrun ... -m sirobust evaluate --n 100` too, with abbreviations allowed, and exits on a string that
# abbreviates several of its own options (--n: --nnodes, --nproc-per-node, ...; --si: --signals-to-handle).
# Every flag now is torchrun-safe (tests/test_torchrun_flags.py); the old spellings get an error naming the new.
RENAMED_FLAGS = {"--n": "-n/--num-examples", "--si": "--with-si"}


def renamed_flag_hint(message: str) -> str:
    """For argparse's 'unrecognized arguments: ...' naming a given-up flag: what to type instead."""
    head, _, rest = message.partition(":")
    if head != "unrecognized arguments":
        return ""
    old = [t.split("=", 1)[0] for t in rest.split()]
    hints = [f"{flag} is now {new}" for flag, new in RENAMED_FLAGS.items() if flag in old]
    if not hints:
        return ""
    return f" ({'; '.join(hints)}: torchrun would take the old spelling for an abbreviation of its own options)"


class Parser(argparse.ArgumentParser):
    """argparse with the error first, on one line, then the usage (argparse prints it the other way round),
    and no abbreviated flags: a command line means the same thing to every reader and every launcher."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)}{renamed_flag_hint(message)}\n"
                     f"{self.format_usage()}")

    def suggestion(self, message: str) -> str:
        """' (did you mean --attacks?)' for a mistyped flag or command: the closest option of this parser and
        of its commands' parsers (argparse reports an unknown flag from the top-level parser), or of the
        choices argparse lists."""
        import difflib
        import re
        if message.startswith("unrecognized arguments: "):
            typed = [w.split("=")[0] for w in message.split(": ", 1)[1].split() if w.startswith("-")]
            known = {o for parser in self.parsers() for action in parser._actions for o in action.option_strings}
        else:
            m = re.match(r"argument .*: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
            typed, known = ([m.group(1)], re.findall(r"'([^']*)'", m.group(2))) if m else ([], set())
        close = [c if c.startswith("-") else repr(c)
                 for word in typed for c in difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.75)]
        return f" (did you mean {' or '.join(close)}?)" if close else ""

    def parsers(self) -> list:
        """This parser and every parser of its commands."""
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        return [self] + [p for a in subs for p in a.choices.values()]


def _typed(fn: Callable, metavar: str = ""):
    """An argparse type from a check: its ValueError/TypeError message becomes argparse's."""
    def parse(text: str):
        try:
            return fn(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = metavar or getattr(fn, "__name__", "value")
    return parse


def parse_number(text: str) -> float:
    """A float or a fraction such as ``8/255`` (never eval'd)."""
    try:
        return checks.parse_number(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.03 or 8/255, got {text!r}") from None


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_numbers(text: str) -> list[float]:
    return [parse_number(t) for t in parse_list(text)]


def parse_param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a number (``8/255`` allowed), true/false (yes/no, on/off) or a word."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. lam=6 or pairing=l2), got {text!r}")
    key, value = (t.strip() for t in text.split("=", 1))
    if value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return key, value.lower() in ("true", "yes", "on")
    try:
        num = checks.parse_number(value)
        return key, int(num) if num.is_integer() and "." not in value and "/" not in value else num
    except (ValueError, TypeError):
        return key, value


def int_arg(flag: str, min: int | None = None, max: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{flag} must be an integer, got {text!r}") from None
        return checks.check_int(flag, value, min, max)
    return _typed(parse, "N")


def float_arg(flag: str, min: float | None = None, max: float | None = None, min_open: bool = False,
              max_open: bool = False):
    return _typed(lambda t: checks.check_float(flag, checks.parse_number(t, flag), min, max, min_open, max_open), "X")


def number_arg(flag: str):
    """A finite number (fractions accepted); range checks that depend on other flags come after parsing."""
    return float_arg(flag)


def name_arg(resolve: Callable[[str], str]):
    return _typed(resolve, "NAME")


def names_arg(kind: str, resolve: Callable[[str], str], valid: Callable[[], Sequence[str]]):
    """A comma-separated, non-empty list of names, each resolved (case-insensitive, with did-you-mean)."""
    def parse(text: str) -> list[str]:
        return [resolve(n) for n in checks.as_names(text, kind, valid())]
    return _typed(parse, "NAMES")


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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they also switch off when not on a terminal)")


def optional_store_true(p: argparse.ArgumentParser, *names: str, help: str, **kw) -> None:
    """A flag whose absence is recorded as None, so --resume can tell 'not given' from 'off'."""
    p.add_argument(*names, action="store_const", const=True, default=None, help=help, **kw)


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


def add_threat_args(p: argparse.ArgumentParser, steps_default: int | None, steps_help: str) -> None:
    """--eps, --norm, --steps, --step-size, --force-step-size: one name for each, in every command."""
    from ..threat import canonical_norm
    p.add_argument("--eps", type=number_arg("--eps"), default=None,
                   help="ε in pixel units, fractions accepted (8/255); default: the dataset's (L∞ 0.1 fashion-mnist, "
                        "0.3 mnist, 8/255 cifar/svhn; L2 1.5, 2.0, 0.5)")
    p.add_argument("--norm", type=name_arg(canonical_norm), default=None, help="Linf (default) or L2")
    p.add_argument("--steps", type=int_arg("--steps", min=1), default=steps_default,
                   help=f"{steps_help} (default {steps_default if steps_default is not None else 'see above'})")
    p.add_argument("--step-size", "--alpha", dest="step_size", type=number_arg("--step-size"), default=None,
                   help="step size of each PGD step, in pixel units (default ε/4; above ε only with --force-step-size)")
    p.add_argument("--force-step-size", action="store_true", default=None,
                   help="accept a step size above ε")


def check_threat(a, eps: float, norm: str) -> None:
    """The checks of --eps and --step-size that need the norm and the ε actually used."""
    checks.check_eps(eps, norm, "--eps")
    if a.step_size is not None:
        checks.check_step_size(a.step_size, eps, a.steps or 1, "--step-size", bool(a.force_step_size))


def add_speed_args(p: argparse.ArgumentParser, train: bool = False) -> None:
    """--precision and --compile (and, for training, --deterministic): how the model is run (docs/speed.md)."""
    from ..fastpath import PRECISIONS, check_precision
    p.add_argument("--precision", type=name_arg(check_precision), default=None if train else "auto",
                   help=f"{', '.join(PRECISIONS)}: auto (default) is bf16 autocast on CUDA with the loss, the "
                        "perturbation and the projection in fp32, and batch-norm folding + channels_last everywhere; "
                        "fp32 runs the model exactly as given (docs/speed.md)")
    store = (lambda *names, help: optional_store_true(p, *names, help=help)) if train else \
        (lambda *names, help: p.add_argument(*names, action="store_true", help=help))
    store("--compile", help="torch.compile the model (the first batches are slow while it compiles)")
    if train:
        store("--deterministic", help="deterministic GPU kernels, so that a GPU run resumes bit-exactly "
                                      "(slower; CPU runs are always exact)")
