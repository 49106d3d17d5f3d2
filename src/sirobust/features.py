"""Run any classifier and get its logits, penultimate features ``z`` and head ``W, b``.

SI-PGD (Sec. 4.2 of the paper) needs ``cos θ_k = W_k·z / (‖W_k‖‖z‖)``, so it must
see the input of the last linear layer. For zoo models (:class:`ImageClassifier`)
that is direct. For a foreign ``nn.Module`` the input of its last ``nn.Linear``
(or of a module the user names) is captured with a forward hook, and the first
call checks that the model's logits really are ``α · (W z + b) + c`` with
``α > 0`` (a per-row constant ``c`` changes no softmax). That is exactly the
family of rescalings SI is immune to, so a wrapper ``α · model(x)`` keeps working.

Example::

    out = forward_with_features(model, x)     # out.logits, out.features, out.weight
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .checks import logits_of
from .models.base import ImageClassifier


class FeatureAccessError(ValueError):
    """The model's penultimate features / last linear layer cannot be found or used."""


@dataclass
class ModelOutput:
    """One forward pass. ``features``/``weight`` are None when not requested."""

    logits: torch.Tensor                     # (B, K)
    features: Optional[torch.Tensor] = None  # (B, D): z, the input of the last linear layer
    weight: Optional[torch.Tensor] = None    # (K, D): W
    bias: Optional[torch.Tensor] = None      # (K,)

    def __post_init__(self):
        # under bf16 autocast (the fast path) the model computes in bf16, but losses and decisions
        # are made in fp32: a margin or a cosine rounded to 8 bits of mantissa would steer the attack badly
        if self.logits.dtype in _HALF:
            self.logits = self.logits.float()
        if self.features is not None and self.features.dtype in _HALF:
            self.features = self.features.float()


HeadSpec = Union[None, str, nn.Linear]
_HALF = (torch.bfloat16, torch.float16)
# every place a head can be named, for the errors that ask for one
HOW_TO_NAME_THE_HEAD = ('(head="NAME" for an attack, attack_params={"si-pgd": {"head": "NAME"}} for evaluate, '
                        '--head NAME on the command line, or a sirobust_head = "NAME" attribute of the model, '
                        "which training reads)")

# Models whose head passed the α·(Wz+b)+c check; keyed weakly so models can be freed.
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a TorchScript module compiled from one."""
    return isinstance(m, nn.Linear) or (isinstance(m, torch.jit.ScriptModule)
                                        and getattr(m, "original_name", None) == "Linear")


def _declared_head(model: nn.Module) -> Optional[str]:
    """The head a model names itself, as its name in ``model.named_modules()``, or None. A ``sirobust_head =
    "NAME"`` attribute must name a submodule (else an error: a typo is not ignored); timm's
    ``pretrained_cfg["classifier"]`` is taken only when it names one. A container named is its last linear layer
    (a fine-tuned ``head = Sequential(Dropout, Linear)``). Looked up through the wrappers that keep a model
    intact: DDP and DataParallel (``module``), ``torch.compile`` (``_orig_mod``) and sirobust's own (``model`` of a
    class with ``wraps_model``: ``Normalized``, ``ScaledLogits``, ...), never through a user's submodules (a timm backbone inside a model of
    one's own declares the backbone's head, not the model's)."""
    m, seen = model, set()
    while isinstance(m, nn.Module) and id(m) not in seen:
        seen.add(id(m))
        own = m.__dict__.get("sirobust_head", getattr(type(m), "sirobust_head", None))
        cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None)
        timm = cfg.get("classifier") if isinstance(cfg, dict) else None
        modules = dict(m.named_modules())
        if isinstance(own, str) and own not in modules:
            raise FeatureAccessError(f"sirobust_head names {own!r}, which is not a submodule of the model; linear "
                                     f"layers in it: {[n for n, x in modules.items() if _is_linear(x)] or 'none'}")
        for name in (own, timm):
            if isinstance(name, str) and name in modules:
                linears = [x for _n, x in modules[name].named_modules() if _is_linear(x)]
                if linears:  # the declared layer, or the last linear layer inside the declared container
                    return next(n for n, x in model.named_modules() if x is linears[-1])
                if name is own:
                    raise FeatureAccessError(f"sirobust_head names {own!r}, a {type(modules[own]).__name__} with no "
                                             "linear layer in it; name the linear layer that gives the logits")
        m = next((getattr(m, a) for a in ("module", "_orig_mod", "model")
                  if isinstance(getattr(m, a, None), nn.Module) and (a != "model" or getattr(type(m), "wraps_model", False))), None)
    return None


def find_head(model: nn.Module, head: HeadSpec = None) -> tuple[str, nn.Linear]:
    """Return (name, module) of the classifier's last linear layer.

    ``head`` may be a module name as in ``model.named_modules()`` (e.g. ``"fc"``),
    the ``nn.Linear`` itself, or None: the head the model declares (a ``sirobust_head = "NAME"`` attribute, or
    timm's ``pretrained_cfg["classifier"]``; looked up through a DDP or DataParallel wrapper), else the last
    ``nn.Linear`` registered.
    """
    named = list(model.named_modules())
    if head is None:
        head = _declared_head(model)
    if isinstance(head, nn.Module):
        for name, m in named:
            if m is head:
                break
        else:
            raise FeatureAccessError("head: the module given is not a submodule of the model")
    elif isinstance(head, str):
        names = dict(named)
        if head not in names:
            linears = [n for n, m in named if _is_linear(m)]
            raise FeatureAccessError(f"head: no submodule named {head!r}; linear layers in this model: {linears or 'none'}")
        name, head = head, names[head]
    elif head is None:
        linears = [(n, m) for n, m in named if _is_linear(m)]
        if not linears:
            raise FeatureAccessError(
                "the model has no nn.Linear layer, so its penultimate features cannot be found; "
                "scale-invariant losses (si, si-margin) need a classifier whose last layer is linear "
                "(pass head='<module name>' if it is a custom linear module)")
        name, head = linears[-1]
    else:
        raise FeatureAccessError(f"head must be None, a module name or an nn.Linear, got {type(head).__name__}")
    if not hasattr(head, "weight") or head.weight is None or head.weight.dim() != 2:
        raise FeatureAccessError(f"head {name!r} has no 2-D weight; it must be a linear layer (out_features, in_features)")
    return name, head


def forward_with_features(model: nn.Module, x: torch.Tensor, head: HeadSpec = None,
                          need_features: bool = True) -> ModelOutput:
    """Run ``model`` on ``x``; with ``need_features`` also return ``z``, ``W`` and ``b``."""
    if not need_features:
        return ModelOutput(logits=logits_of(model(x)))
    if isinstance(model, ImageClassifier) and head is None:
        z = model.features(x)
        return ModelOutput(model.head(z), z, model.head.weight, model.head.bias)
    name, lin = find_head(model, head)
    if isinstance(lin, torch.jit.ScriptModule):
        return _script_features(model, x, name, lin)
    captured: list[torch.Tensor] = []
    handle = lin.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = logits_of(model(x))
    finally:
        handle.remove()
    if not captured:
        raise FeatureAccessError(f"the head {name!r} was not called in the forward pass; name the final linear layer "
                                 + HOW_TO_NAME_THE_HEAD)
    z = captured[-1]  # the last call is the one that produced the logits
    if z.dim() != 2 or logits.dim() != 2 or z.shape[0] != logits.shape[0]:
        raise FeatureAccessError(
            f"head {name!r} received features of shape {tuple(z.shape)} for logits of shape {tuple(logits.shape)}; "
            "expected (B, D) features and (B, K) logits")
    if _CHECKED.get(model) != name:
        with torch.no_grad():  # the head's own output (a cosine head is not W z + b)
            _check_affine(logits.detach(), lin(z.detach()), name)
        _CHECKED[model] = name
    return ModelOutput(logits, z, lin.weight, lin.bias)


def _script_features(model: nn.Module, x: torch.Tensor, name: str, lin) -> ModelOutput:
    """TorchScript hides module calls from hooks: the features come from the model's exported
    ``forward_features`` (timm's name) or ``features`` method, checked once against its logits."""
    fn = getattr(model, "forward_features", None) or getattr(model, "features", None)
    if fn is None:
        raise FeatureAccessError(
            "this TorchScript model hides its penultimate features (TorchScript has no forward hooks); export a "
            "forward_features(x) method returning the input of its last linear layer (@torch.jit.export), or "
            "evaluate the Python model with --model-def")
    z = fn(x)
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise FeatureAccessError(f"forward_features returned {getattr(z, 'shape', type(z).__name__)}, not (B, D) features")
    head_out = lin(z)
    if _CHECKED.get(model) != name:
        with torch.no_grad():
            _check_affine(logits_of(model(x)), head_out.detach(), name)
        _CHECKED[model] = name
    # checked: the logits are α·(W z + b) + c with α > 0, so W z + b ranks the classes as they do
    return ModelOutput(head_out, z, lin.weight, lin.bias)


def _check_affine(logits: torch.Tensor, head_out: torch.Tensor, name: str) -> None:
    """Raise unless logits == α·head_out + c(row) with α > 0 (least squares on row-centred values)."""
    if logits.shape != head_out.shape:
        raise FeatureAccessError(
            f"the model's logits have shape {tuple(logits.shape)} but its last linear layer {name!r} gives "
            f"{tuple(head_out.shape)}: the output is not a rescaling of that layer (name the head "
            + HOW_TO_NAME_THE_HEAD + ")")
    lc = (logits - logits.mean(1, keepdim=True)).double()
    hc = (head_out - head_out.mean(1, keepdim=True)).double()
    denom = (hc * hc).sum()
    if denom == 0:
        return  # constant head output: nothing to compare (degenerate but not wrong)
    alpha = (lc * hc).sum() / denom
    resid = (lc - alpha * hc).norm() / lc.norm().clamp_min(1e-30)
    if not torch.isfinite(alpha) or alpha <= 0 or resid > 1e-3:
        raise FeatureAccessError(
            f"the model's logits are not a positive multiple of its last linear layer {name!r} "
            f"(best fit α = {alpha.item():.3g}, relative residual {resid.item():.2g}); scale-invariant attacks need "
            "logits = α·(W z + b) + c with α > 0. Name the final linear layer " + HOW_TO_NAME_THE_HEAD
            + ", or remove what follows it.")
