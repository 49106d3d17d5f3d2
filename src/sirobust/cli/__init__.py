"""Command line: ``sirobust {demo,train,evaluate,rescale,compare,reproduce,list}``.

Names become objects here and nowhere deeper; one module per command.
"""
from __future__ import annotations

import pickle
import sys
from typing import Optional, Sequence

from .. import STARTUP_INTERRUPTED

try:  # still starting (the console script imports this module before main runs): one line, exit 130
    from .args import Parser, parse_list, parse_number, parse_numbers, parse_param
    from .train import train_config_from_args
except KeyboardInterrupt:
    print(STARTUP_INTERRUPTED, file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["main", "build_parser", "parse_number", "parse_list", "parse_numbers", "parse_param",
           "train_config_from_args"]


def build_parser() -> Parser:
    from .._version import __version__
    from . import compare, demo, evaluate, listing, reproduce, rescale, train
    parser = Parser(prog="sirobust", description="Scale-invariant adversarial attacks and defenses.",
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"sirobust {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, train, evaluate, rescale, compare, reproduce, listing):
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # each result line reaches a pipe or log when printed
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from ..checkpoint import CheckpointError
        from ..data import ChecksumError, DataNotFoundError
        from ..features import FeatureAccessError
        from ..foreign import ModelLoadError
        from ..interrupts import RunInterrupted, terminate_as_interrupt
        from ..io import OutputError
        from ..train import TrainingDiverged
    except KeyboardInterrupt:  # still starting: nothing was written
        print(STARTUP_INTERRUPTED, file=sys.stderr)
        return 130
    terminate_as_interrupt()  # `kill` then runs every cleanup (locks, temporary files) like Ctrl-C does
    try:
        return args.func(args)
    except RunInterrupted as e:
        print(f"sirobust {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, TypeError, FileNotFoundError, PermissionError, OutputError, CheckpointError,
            DataNotFoundError, ChecksumError, FeatureAccessError, ModelLoadError, TrainingDiverged,
            pickle.UnpicklingError) as e:
        if isinstance(e, TypeError) and not str(e):
            raise
        print(f"sirobust {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = {"train": " (the last finished checkpoint is kept; continue with --resume)",
                "compare": " (finished runs are kept; continue with --resume)"}.get(args.command, "")
        print(f"sirobust {args.command}: interrupted; every file written so far is complete{kept}", file=sys.stderr)
        return getattr(e, "exit_code", 130)  # 143 for SIGTERM
    finally:
        from ..distributed import shutdown
        shutdown()  # leave a torchrun process group cleanly (nothing to do alone)
