"""What a training run measures after each epoch: clean and PGD accuracy on the held-out split (model
selection), and PGD accuracy on a fixed training subset, the catastrophic-overfitting guard (Wong et al.,
"Fast is better than free", ICLR 2020).

Both share a fixed example set among the processes of a distributed run; the attack's random starts are
keyed by the examples' indices, so the numbers do not depend on how many processes share it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .attacks import PGD
from .distributed import Group
from .io import read_jsonl
from .metrics import correct_mask, eval_mode
from .train_config import TrainConfig

COLLAPSE_DROP = 0.2  # a fall of PGD accuracy this far below its best so far is a collapse (Wong et al. 2020)


def _slice(images: torch.Tensor, labels: torch.Tensor, group: Optional[Group]):
    """This process's contiguous share of a fixed example set, and the examples' indices (which key the
    attack's random starts, so the result does not depend on how the set is shared)."""
    keys = torch.arange(len(labels))
    if group is not None and group.enabled:
        keys = keys.tensor_split(group.world)[group.rank]
    return images[keys], labels[keys], keys


def validate(model, val_ds, n: int, cfg: TrainConfig, device, epoch: int, group: Optional[Group] = None,
             attacked: bool = True) -> dict:
    """Clean and PGD accuracy on the first ``n`` held-out examples (shared among the processes of a group).
    ``attacked`` False: the robust accuracy is the clean one (no adversary and ε = 0: PGD could not move)."""
    x, y, keys = _slice(val_ds.images[:n], val_ds.labels[:n], group)
    with eval_mode(model):
        clean = correct_mask(model, x, y, batch_size=256, device=device)
        if not attacked:
            robust = clean
        else:
            atk = PGD(model, eps=cfg.eps, alpha=cfg.eps / 4, steps=cfg.val_steps, norm=cfg.norm, seed=cfg.seed + epoch,
                      precision=cfg.precision)
            robust = correct_mask(model, x, y, batch_size=256, attack=atk, device=device, keys=keys)
    hits = (group or Group()).sum({"clean": clean.sum().item(), "robust": robust.sum().item()})
    return {"val_clean_acc": hits["clean"] / n, "val_robust_acc": hits["robust"] / n, "val_n": n}


def overfit_check(model, subset, cfg: TrainConfig, device, epoch: int, before: list,
                  group: Optional[Group] = None) -> dict:
    """PGD-5 accuracy (steps of ε/4) on a fixed training subset, and whether it collapsed: more than 0.2 below
    the best so far (Wong et al. 2020 stop FGSM training there: catastrophic overfitting)."""
    x, y, keys = _slice(subset.images, subset.labels, group)
    with eval_mode(model):
        atk = PGD(model, eps=cfg.eps, alpha=cfg.eps / 4, steps=5, norm=cfg.norm, seed=cfg.seed + epoch,
                  precision=cfg.precision)
        hits = correct_mask(model, x, y, batch_size=256, attack=atk, device=device, keys=keys).sum().item()
    acc = (group or Group()).sum({"hits": hits})["hits"] / len(subset.labels)
    return {"overfit_pgd_acc": acc, "overfit_collapse": bool(before) and acc < max(before) - COLLAPSE_DROP}


def guard_overfitting(row: dict, model, subset, cfg: TrainConfig, device, epoch: int, metrics_path: Path,
                      validated: bool, group: Group, log) -> bool:
    """The guard's numbers for this epoch into ``row`` (compared with the earlier epochs' in
    ``metrics_path``); True at a collapse, which is said, with what happens next."""
    before = group.first(lambda: [r["overfit_pgd_acc"] for r in read_jsonl(metrics_path) if "overfit_pgd_acc" in r])
    row.update(overfit_check(model, subset, cfg, device, epoch, before, group))
    if row["overfit_collapse"]:
        log(f"warning: catastrophic overfitting in epoch {epoch + 1}: PGD accuracy on {len(subset)} "
            f"training images fell to {row['overfit_pgd_acc']:.3f} from a best of {max(before):.3f}"
            + (("; stopping (--early-stop)" + (", best.safetensors is from before the collapse" if validated else ""))
               if cfg.early_stop else "; pass --early-stop to stop at a collapse"))
    return row["overfit_collapse"]
