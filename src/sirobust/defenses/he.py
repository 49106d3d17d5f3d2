"""TRADES with hypersphere embedding (Pang et al., "Boosting Adversarial Training
with Hypersphere Embedding", NeurIPS 2020); paper Table 10 (TRADES-HE), s = 15,
m = 0.2, λ = 6.

HE normalises the features and the head weights (FN + WN, no bias), so the
logits become ``s · cos θ`` everywhere, and adds an angular margin ``m`` on the
true class where a CE is taken on labels:

    training objective    CE(s · (cos θ(x) − m · onehot(y)), y) + λ · KL(s·cos θ(x) ‖ s·cos θ(x^'))
    adversarial objective KL(s·cos θ(x) ‖ s·cos θ(x'))

The margin is only in the CE term; both KL terms (inner and outer) use
``s · cos θ`` without margin. That is what Pang et al.'s TRADES-HE code does
(``HELoss(logits, y, cm=m)`` for the natural term; ``KL(softmax(s·logits) ‖
softmax(s·logits_adv))`` without margin for the robust term and for the attack).
It is also the consistent choice: the margin is a training device that needs
the label, while the KL compares the model's two *predictions*, which are
``s · cos θ`` with no margin.

Implementation: TRADES itself, run on the model wrapped by
:class:`HypersphereLogits` (``x ↦ s · cos θ``), so every logit the base
algorithm sees, in the attack and in training, is ``s · cos θ``; only the CE
term adds the margin. Stats (clean_acc, adv_acc) are therefore those of the
cosine classifier. Note that the model itself keeps its plain linear head: to
evaluate a TRADES-HE model as Pang et al. do, wrap it with
:class:`HypersphereLogits` (its predictions are argmax cos θ, which the raw
``Wᵀz + b`` need not match since HE never trains the bias or the weight norms).

HE with SI is not a combination the paper uses (HE already is the cosine-logit
variant), so ``si`` raises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_param
from ..distributed import unwrap
from ..features import forward_with_features
from ..losses import cosine_logits
from .trades import TRADES, kl_clean_adv


class HypersphereLogits(nn.Module):
    """``x ↦ s · cos θ(x)``, cos θ_k = W_k·z / (‖W_k‖‖z‖) of ``model``'s last linear layer (bias dropped)."""

    wraps_model = True  # the model inside keeps its own head (sirobust.features finds it through this)

    def __init__(self, model: nn.Module, scale: float = 15.0):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        # mirror the model's flag without model.train(), which would recurse into it
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # raises FeatureAccessError if the model has no usable linear head
        return self.scale * cosine_logits(forward_with_features(self.model, x, need_features=True))


class HE(TRADES):
    """HE: TRADES on s·cos θ with an angular margin (hypersphere embedding, Pang et al. 2020)."""

    name = "he"
    leaves_parameters_unused = True  # the cosine head never uses its bias
    zoo_models_only = "it replaces the model's head by a cosine head, which only sirobust's own models have"

    def __init__(self, attack=None, si=None, lam: float = 6.0, scale: float = 15.0, margin: float = 0.2):
        if si is not None:
            raise ValueError("he (TRADES with hypersphere embedding) cannot be combined with --with-si: HE already "
                             "uses s·cos θ logits and the paper compares TRADES-HE with TRADES-SI (Table 10); "
                             "use --defense trades --with-si for the latter")
        super().__init__(attack=attack, si=None, lam=lam)
        self.scale = check_param("he", "scale (s)", scale, min=0, min_open=True)
        self.margin = check_param("he", "margin (m)", margin, min=0)

    def prepare_model(self, model: nn.Module) -> None:
        """HE's classifier is s · cos θ (Pang et al. 2020): the run trains, validates and saves it that way."""
        model.use_cosine_head(self.scale)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model whose logits are s · cos θ (idempotent)."""
        return model if isinstance(model, HypersphereLogits) else HypersphereLogits(model, self.scale)

    # The base algorithm, run on the wrapped model: every logit it sees is s · cos θ.
    # ``clean`` (if given) must be an output of the wrapped model.
    def make_adversarial(self, model, x, y, generator=None, clean=None):
        inner = model.model if isinstance(model, HypersphereLogits) else model
        return super().make_adversarial(self.wrap(unwrap(inner)), x, y, generator, clean)  # never through DDP

    def __call__(self, model, x, y, generator=None):
        return super().__call__(self.wrap(model), x, y, generator)

    def training_loss(self, model, x, x_adv, y, clean, adv):
        # clean.logits = s·cos θ(x), adv.logits = s·cos θ(x^'); the margin s·m only on the true class, only in the CE
        margin_logits = clean.logits - self.scale * self.margin * F.one_hot(y, clean.logits.shape[1]).to(clean.logits.dtype)
        return F.cross_entropy(margin_logits, y) + self.lam * kl_clean_adv(clean.logits, adv.logits).mean()

    def describe(self) -> dict:
        d = super().describe()
        d["params"].update(scale=self.scale, margin=self.margin)
        return d
