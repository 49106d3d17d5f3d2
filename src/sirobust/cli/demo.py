"""``sirobust demo``: the paper's story in a few minutes on a CPU."""
from __future__ import annotations

from .args import add_common_args, add_output_args, output_path, run_mode

DEFAULT_OUT = "runs/demo"


def cmd_demo(a) -> int:
    from ..demo import run_demo
    run_demo(out=str(output_path(a, DEFAULT_OUT)), mode=run_mode(a), quick=a.quick, device=a.device,
             progress=not a.no_progress)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a robust model on the bundled data, attack it, run the rescaling study")
    add_output_args(p, DEFAULT_OUT, "results folder")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
    add_common_args(p)
    p.set_defaults(func=cmd_demo)
