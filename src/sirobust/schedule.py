"""The learning-rate schedules: the paper's presets (Sec. 5.1) and the rate at each batch of a run.

The rate is a pure function of the position in the run (:func:`learning_rate`), so that resume is exact
with no scheduler state to save.
"""
from __future__ import annotations

# Paper Sec. 5.1 (and SPEC.md): SGD, momentum 0.9. A milestone m means "after m epochs": the rate is
# divided by 10 from the (m+1)-th epoch on, 1-based (torch's MultiStepLR stepped once per epoch).
# The paper's "divided at epochs 75, 90 and 100" is TRADES' and MART's code, `for epoch in range(1,
# epochs + 1)` with `if epoch >= 75: lr = 0.1 · lr` (and 90, 100): the 75th epoch already runs at the
# lower rate, so the presets are 74, 89, 99 (ResNet) and 74 (WRN). Preset milestones are for the
# preset's own length and are rescaled when --epochs differs (an explicit --milestones never is).
SCHEDULES = {
    "resnet": dict(lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=(74, 89, 99), epochs=120),
    "wideresnet": dict(lr=0.1, momentum=0.9, weight_decay=7e-4, milestones=(74,), epochs=90),
    # not in the paper: the small CNN for 28×28 data, tuned to learn in a few epochs on CPU
    "small": dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(23, 27), epochs=30),
}
# the preset a model trains with when no schedule is named (any other model: resnet)
MODEL_SCHEDULE = {"resnet18": "resnet", "preact-resnet18": "resnet", "preact-resnet18-wong": "resnet",
                  "preact-resnet18-gradalign": "resnet", "resnet50": "resnet",
                  "wrn-34-10": "wideresnet", "wrn-28-10": "wideresnet", "cnn-small": "small"}

LR_SCHEDULES = ("piecewise", "cyclic", "onecycle")


def learning_rate(cfg, epoch: int, batch: int, batches: int) -> float:
    """The learning rate of batch ``batch`` (0-based) of epoch ``epoch`` (0-based), a pure function of the
    position in the run (so resume is exact with no scheduler state). ``cfg`` is a resolved
    :class:`~sirobust.train_config.TrainConfig` (not imported: the schedules sit below the trainer).

    - piecewise: ``lr`` times lr_gamma per milestone m with m <= epoch (0-based): a milestone m lowers the
      rate from the (m+1)-th epoch on, 1-based (the paper's schedules; see SCHEDULES);
    - cyclic: triangular, 0 → ``lr`` at half the run → 0 (Wong et al. 2020's CyclicLR for FGSM-RS);
    - onecycle: piecewise linear, 0 → ``lr`` at 2/5 of the run → 0 (Andriushchenko & Flammarion 2020's
      schedule for GradAlign).
    Both cyclic kinds move per batch, evaluated after the batch ((batch + 1) / batches of the epoch done),
    so the first batch already has a positive rate."""
    if cfg.lr_schedule == "piecewise":
        return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    t = epoch + (batch + 1) / batches
    peak = (0.5 if cfg.lr_schedule == "cyclic" else 0.4) * cfg.epochs
    frac = t / peak if t <= peak else max(0.0, (cfg.epochs - t) / (cfg.epochs - peak))
    return cfg.lr * min(1.0, frac)

