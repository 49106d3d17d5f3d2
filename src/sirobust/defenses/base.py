"""A defense is a loss over a batch: ``loss, stats = defense(model, x, y)``.

Multi-step defenses share one shape (Table 1 of the paper): build adversarial
examples by maximising an *adversarial objective* with the PGD loop (inner
maximisation), then minimise a *training objective* (outer minimisation).
A subclass states the two objectives and nothing else. The SI mechanism
(Sec. 4.3) is applied here, once, for every defense: the inner loss becomes
``CE(s · cos θ, y)`` and the outer loss gains ``β · CE(s · (cos θ − m · 1_y), y)``
on the adversarial examples (:mod:`sirobust.defenses.si`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..attacks.loop import pgd_loop
from ..checks import check_float, check_int, resolve_name
from ..distributed import unwrap
from ..fastpath import fp32_island, frozen_parameters
from ..features import ModelOutput, forward_with_features
from ..losses import Loss, get_loss
from ..modes import model_mode
from ..rng import as_noise
from ..threat import ThreatModel, make_threat
from .si import SIConfig, si_regulariser

_MODES = ("eval", "train")


START_KINDS = ("uniform", "normal")
NORMAL_START_STD = 0.001  # TRADES' and MART's reference code: x + 0.001 · N(0, I), in pixel units


@dataclass
class InnerAttack:
    """The training adversary: PGD with random start, ``steps`` steps of ``alpha``
    (paper: ε = 8/255, 10 steps of ε/4). ``model_mode`` is the mode the model is
    put in while the examples are made (eval, as TRADES and the paper's code do).

    ``start`` is the kind of random start, when ``random_start`` is on: ``"uniform"`` in the
    ε-ball (the threat model's ``random_init``), or ``"normal"``: ``x + 0.001 · N(0, I)``
    projected onto the ball and [0, 1], as TRADES' and MART's reference code start
    (:data:`NORMAL_START_STD`, pixel units, whatever ε). Both draw from the generator the
    training loop passes, never from the global RNG."""

    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    norm: str = "Linf"
    random_start: bool = True
    model_mode: str = "eval"
    start: str = "uniform"

    def __post_init__(self):
        self.model_mode = resolve_name("attack model_mode", self.model_mode, _MODES)
        self.start = resolve_name("attack start", self.start, START_KINDS)
        # checked, not converted: the numbers are recorded as given (describe())
        check_int("attack steps", self.steps, min=0)
        self.threat: ThreatModel = make_threat(self.norm, self.eps)
        if self.alpha is None:
            self.alpha = self.eps / 4
        check_float("attack alpha", self.alpha, min=0)

    def start_point(self, x: torch.Tensor, generator=None) -> Optional[torch.Tensor]:
        """The first iterate for :func:`~sirobust.attacks.loop.pgd_loop`'s ``start``, or None where the loop
        makes it itself (no random start, or the uniform one: the threat model's ``random_init``)."""
        if not self.random_start or self.start == "uniform" or self.steps == 0 or self.threat.eps == 0:
            return None  # (no steps or no ball: the loop returns x and draws nothing, nor does this)
        x = x.detach()
        return self.threat.project(x + NORMAL_START_STD * as_noise(generator).normal(x), x)


class Defense:
    """Base class. Subclasses override :meth:`adversarial_loss` and :meth:`training_loss`.

    The training loop calls every defense the same way (:func:`sirobust.train._train_epoch`)::

        defense.prepare_model(model)                  # once, before training (HE's cosine head)
        defense.start_epoch(epoch, epochs)          # schedules of the defense's own weights (GAT's λ)
        for index, (x, y) in enumerate(batches):
            defense.start_batch(index)
            for _ in range(defense.replays):         # FreeAT replays each minibatch m times
                loss, stats = defense(model, x, y)
                loss.backward()
                defense.after_backward()             # FreeAT updates its persistent δ from this backward
                optimizer.step()

    and saves ``defense.state_dict()`` with the run's state, so that resume is exact for
    defenses that carry state across batches.
    """

    name = "defense"
    uses_attack = True
    replays = 1
    # the inner attack this defense's reference code uses, where it is not the paper's 10-step PGD of ε/4:
    # steps, alpha (a multiple of ε), random_start, model_mode; any of them a user flag overrides
    inner_preset: dict = {}
    # the learning-rate schedule its reference code uses (None: the model's piecewise preset)
    lr_schedule_preset: Optional[str] = None
    # single-step defenses can overfit catastrophically: their runs check for it every epoch by default
    guard_overfitting = False
    # why the adversary does not start from InnerAttack's random start (so --attack-start cannot apply to it);
    # None: it does
    own_start: Optional[str] = None
    # the inner-attack settings the defense does not use, each with why (FreeAT steps once per replay); a user
    # flag setting one of them to another value than the preset's is refused, not recorded and ignored
    unused_attack_settings: dict = {}
    # why the defense trains sirobust's own models only (HE: it replaces the model's head), or None
    zoo_models_only: Optional[str] = None
    # does the adversary's step come from the training pass's own backward (FreeAT), costing no passes of its own?
    attack_reuses_training_backward = False
    # does the training objective leave some parameters without a gradient (HE: its cosine head's bias)? DDP
    # must then look for them after each backward
    leaves_parameters_unused = False

    def __init__(self, attack: Optional[InnerAttack] = None, si: Optional[SIConfig] = None):
        self.attack = attack or InnerAttack()
        self.si = si

    # ----- the two objectives (Table 1) --------------------------------------------------
    def adversarial_loss(self, clean: ModelOutput) -> Loss:
        """The loss the inner PGD maximises, without SI. Default: CE(f(x'), y)."""
        return get_loss("ce")

    def training_loss(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                      clean: Optional[ModelOutput], adv: ModelOutput) -> torch.Tensor:
        """The per-batch training objective, without the SI term (a scalar)."""
        raise NotImplementedError

    needs_clean_output = False  # does the training objective use f(x) (TRADES, MART, ALP) as well as f(x')?
    attack_uses_clean = False   # does the adversarial objective use f(x) (TRADES' KL)?

    # ----- the one algorithm ----------------------------------------------------------------
    def inner_loss(self, clean: Optional[ModelOutput] = None) -> Loss:
        """What the adversary maximises: with SI the SI loss CE(s·cos θ, y), else the defense's own."""
        return get_loss("si", scale=self.si.scale) if self.si is not None else self.adversarial_loss(clean)

    def make_adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         generator: Optional[torch.Generator] = None,
                         clean: Optional[ModelOutput] = None) -> torch.Tensor:
        inner = self.inner_loss(clean)
        # input gradients only: no weight-gradient work or memory while the examples are made
        with model_mode(model, self.attack.model_mode), frozen_parameters(model):
            return pgd_loop(model, x, y, loss=inner, threat=self.attack.threat, alpha=self.attack.alpha,
                            steps=self.attack.steps, random_start=self.attack.random_start,
                            early_stop=False, noise=generator, start=self.attack.start_point(x, generator))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        """Loss over the batch (a differentiable scalar) and a dict of float stats."""
        clean_for_attack = None
        # the adversary runs the module itself, never a DDP wrapper: its input-only gradients must not start
        # DDP's gradient reduction (the training objective below goes through the wrapper)
        inner = unwrap(model)
        if self.attack_uses_clean and self.si is None:
            # TRADES' inner KL needs f(x) from the model in the attack's mode
            with model_mode(inner, self.attack.model_mode), torch.no_grad():
                clean_for_attack = ModelOutput(inner(x))
        x_adv = self.make_adversarial(inner, x, y, generator, clean_for_attack)
        need_feat = self.si is not None
        clean = forward_with_features(model, x, need_features=False) if self.needs_clean_output else None
        adv = forward_with_features(model, x_adv, need_features=need_feat)
        with fp32_island(x.device):  # losses in fp32 whatever the model ran in
            loss = self.training_loss(model, x, x_adv, y, clean, adv)
            reg = si_regulariser(adv, y, self.si) if self.si is not None else None
        stats = {"loss_defense": loss.item()}
        if self.si is not None:
            stats["loss_si"] = reg.item()
            loss = loss + reg
        logits = adv.logits.detach()
        stats["adv_acc"] = (logits.argmax(1) == y).float().mean().item()
        if clean is not None:
            stats["clean_acc"] = (clean.logits.detach().argmax(1) == y).float().mean().item()
        return loss, stats

    # ----- the training loop's hooks (defaults: nothing to do) ---------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Adapt a freshly built model before training, in place (HE: its cosine head)."""

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Before epoch ``epoch`` (0-based) of ``epochs``."""

    def start_batch(self, index: int) -> None:
        """Before the minibatch ``index`` (0-based, within the epoch) and all its replays."""

    def after_backward(self) -> None:
        """After ``loss.backward()`` of each replay, before the optimizer step."""

    def state_dict(self) -> dict:
        """What the defense carries from batch to batch (tensors and numbers), for exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"defense {self.name!r} carries no state, but the checkpoint has {sorted(state)}")

    def describe(self) -> dict:
        """Everything that defines this defense, for the run's config record."""
        a = self.attack
        return {"defense": self.name, "si": None if self.si is None else vars(self.si),
                "attack": {"eps": a.eps, "alpha": a.alpha, "steps": a.steps, "norm": a.threat.norm,
                           "random_start": a.random_start, "start": a.start, "model_mode": a.model_mode}}
