"""``sirobust list``: every name the other commands accept."""
from __future__ import annotations


def cmd_list(a) -> int:
    from ..attacks import list_attacks
    from ..data import list_datasets
    from ..defenses import list_defenses
    from ..losses import list_losses
    from ..models import list_models
    for what, names in [("datasets", list_datasets()), ("models", list_models()), ("attacks", list_attacks()),
                        ("losses", list_losses()), ("defenses", list_defenses())]:
        print(f"{what}: {', '.join(names)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("list", help="list datasets, models, attacks, losses and defenses")
    p.set_defaults(func=cmd_list)
