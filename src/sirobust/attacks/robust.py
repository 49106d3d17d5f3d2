"""The one loop that attacks only the examples still robust, round after round, and stops when none is left.

A round is a restart (:class:`~sirobust.attacks.Attack`), a target class (APGD-T, FAB-T) or a stage of an
ensemble (AutoAttack): AutoAttack's worst case (Croce & Hein 2020, Sec. 4), where an example counts as
robust only if it survives every round, and a broken example costs no more forward passes.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

# attack(round, idx) -> (adversarial points for x[idx], which of them fool the model (len(idx),) bool)
Round = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def attack_still_robust(x: torch.Tensor, robust: torch.Tensor, rounds: Iterable[int], attack: Round, *,
                        keep_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``attack(r, idx)`` for each round ``r`` on the indices ``idx`` of the examples no earlier round
    broke (``robust`` (B,) bool marks those worth attacking at all; it is not modified).

    Returns ``(x_adv, broke)``: per example the point of the round that broke it, and that round (−1 where
    none did). A survivor keeps ``x`` or, with ``keep_last``, the last round's point for it (restarts:
    the point the last run ended at).
    """
    out = x.clone()
    robust = robust.clone()
    broke = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for r in rounds:
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break  # early stop: nothing is left to break
        adv, fooled = attack(r, idx)
        hit = idx[fooled]
        if keep_last:
            out[idx] = adv
        else:
            out[hit] = adv[fooled]
        robust[hit] = False
        broke[hit] = r
    return out, broke
