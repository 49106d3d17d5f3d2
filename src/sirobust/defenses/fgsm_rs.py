"""FGSM with a random start (Wong, Rice & Kolter, "Fast is better than free: revisiting adversarial
training", ICLR 2020), the paper's RFGSM-AT (Table 8).

Training objective CE(f(x'), y), as AT; the adversary is one signed step of 1.25ε from a uniform start in
the ε-ball, projected back into the ball and [0, 1]. Their code keeps the model in train mode throughout
and trains with a cyclic learning rate; it is prone to catastrophic overfitting (PGD accuracy collapsing
within an epoch), so runs check for it every epoch (``--early-stop`` stops there).
"""
from __future__ import annotations

from .at import AT


class FGSMRS(AT):
    """FGSM-RS "fast" AT (Wong et al. 2020): one step of 1.25ε from a random start, cyclic lr."""

    name = "fgsm-rs"
    inner_preset = {"steps": 1, "alpha": 1.25, "random_start": True, "model_mode": "train"}
    lr_schedule_preset = "cyclic"
    guard_overfitting = True
