"""What one call of an attack returns: the adversarial points and what the attack measured on the way.

Every attack's :meth:`~sirobust.attacks.Attack.perturb` returns an :class:`AttackOutput`; ``atk(x, y)``
returns its ``x_adv`` alone (torchattacks' API). Measurements are per example of the batch, on the
batch's device, or None when the attack does not measure them; nothing is left on the attack object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class AttackOutput:
    """``x_adv`` (same shape as the input) and, per example (B,):

    - ``queries``: model queries spent (score- and decision-based attacks: Square, SPSA, RayS), summed over
      restarts; 0 for an example that was not attacked;
    - ``stages``: ensembles (AutoAttack): the index of the stage that broke the example in the ensemble's
      plan for the model (:meth:`~sirobust.attacks.Attack.stage_plan`), −1 where none did, −2 where the
      model got it wrong without attack;
    - ``distances``: boundary searches (RayS): the distance of the decision boundary found, float64 (0 for an
      example misclassified as given, inf where none was found within the budget).
    """

    x_adv: torch.Tensor
    queries: Optional[torch.Tensor] = None
    stages: Optional[torch.Tensor] = None
    distances: Optional[torch.Tensor] = None


def as_output(result: Union[torch.Tensor, AttackOutput]) -> AttackOutput:
    """What an attack's ``run`` returned as an :class:`AttackOutput` (an attack that measures nothing may
    return its points alone)."""
    return result if isinstance(result, AttackOutput) else AttackOutput(result)
