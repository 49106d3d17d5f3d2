"""``sirobust list``: every name the other commands accept, each with a one-line description."""
from __future__ import annotations


def entries() -> list[tuple[str, list[tuple[str, str]]]]:
    from ..attacks import describe_attack, list_attacks
    from ..data import get_dataset_info, list_datasets
    from ..defenses import describe_defense, list_defenses
    from ..losses import describe_loss, list_losses
    from ..models import describe_model, list_models
    return [
        ("datasets", [(n, get_dataset_info(n).description) for n in list_datasets()]),
        ("models", [(n, describe_model(n)) for n in list_models()]),
        ("attacks", [(n, describe_attack(n)) for n in list_attacks()]),
        ("losses", [(n, describe_loss(n)) for n in list_losses()]),
        ("defenses", [(n, describe_defense(n)) for n in list_defenses()]),
        ("norms", [("Linf", "L∞ ball: every pixel moves by at most ε"),
                   ("L2", "L2 ball: the perturbation's Euclidean norm is at most ε")]),
    ]


def cmd_list(a) -> int:
    for what, rows in entries():
        print(f"{what}:")
        width = max(len(n) for n, _ in rows)
        for name, text in rows:
            print(f"  {name:<{width}}  {text}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("list", help="list datasets, models, attacks, losses, defenses and norms, with what each is")
    p.set_defaults(func=cmd_list)
