"""The one validation layer, shared by the Python API and the command line.

Every check raises an error whose message names the argument, the value it
got and what is allowed, so that ``sirobust train --eps 8`` and
``PGD(model, eps=8)`` fail the same way, before any work is spent.

* numbers: :func:`check_int`, :func:`check_float`, :func:`parse_number`
* a component's own parameters (a defense's λ, ``--defense-param``): :func:`check_param`
* the threat model: :func:`check_eps` (with a hint when ``8`` means ``8/255``),
  :func:`check_step_size`
* names: :func:`resolve_name` (case-insensitive, "did you mean ...", the list)
* tensors: :func:`check_images`, :func:`check_labels`, :func:`check_same_device`
"""
from __future__ import annotations

import difflib
import math
import numbers
from fractions import Fraction
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn


class UnknownNameError(ValueError):
    """A name that is not in its registry; the message suggests the closest and lists them all."""


# --------------------------------------------------------------------------- numbers

def parse_number(value: Union[str, numbers.Real], name: str = "value") -> float:
    """A real number, or a string such as ``"0.03"`` or ``"8/255"`` (never eval'd)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name} must be a number such as 0.03 or 8/255, got {value!r}") from None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    raise TypeError(f"{name} must be a number such as 0.03 or 8/255, got {type(value).__name__}")


def check_int(name: str, value, min: Optional[int] = None, max: Optional[int] = None) -> int:
    """``value`` as an int within [min, max]; floats that are whole numbers are accepted."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        raise ValueError(f"{name} must be {_range_text(min, max)}, got {value}")
    return value


def check_float(name: str, value, min: Optional[float] = None, max: Optional[float] = None,
                min_open: bool = False, max_open: bool = False) -> float:
    """``value`` as a finite float within the given bounds (``*_open``: the bound itself excluded)."""
    value = parse_number(value, name)
    low_bad = min is not None and (value <= min if min_open else value < min)
    high_bad = max is not None and (value >= max if max_open else value > max)
    if not math.isfinite(value) or low_bad or high_bad:
        bounds = _range_text(min, max, min_open, max_open)
        raise ValueError(f"{name} must be a finite number{'' if bounds == 'finite' else ' ' + bounds}, got {value}")
    return value


def check_param(owner: str, name: str, value, min: Optional[float] = None, max: Optional[float] = None,
                min_open: bool = False, max_open: bool = False, integer: bool = False) -> Union[float, int]:
    """A component's numeric parameter (``--defense-param lam=6``) as a float (an int with ``integer``)
    within the given bounds.

    Whatever is wrong (a word, a bool, a value out of range) the error is a ValueError that names the
    owner, the parameter and the allowed values: ``trades parameter lam (λ) must be a finite number >= 0,
    got 'abc'``."""
    label = f"{owner} parameter {name}"
    try:
        if integer:
            return check_int(label, value, min, max)
        return check_float(label, value, min, max, min_open, max_open)
    except (TypeError, ValueError):
        bounds = _range_text(min, max, min_open, max_open)
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{label} must be {kind}{'' if bounds == 'finite' else ' ' + bounds}, got {value!r}") \
            from None


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


# --------------------------------------------------------------------------- the threat model

def check_eps(eps, norm: str = "Linf", name: str = "eps", dim: Optional[int] = None) -> float:
    """ε in pixel units: L∞ in [0, 1]; L2 in [0, √dim] (the diameter of the pixel box) when ``dim`` is known.

    ``eps=8`` for L∞ is refused with the hint that 8/255 is probably meant."""
    eps = parse_number(eps, name)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (pixel units), got {eps}")
    if norm == "Linf" and eps > 1:
        hint = f"; did you mean {eps:g}/255 = {eps / 255:.6g}?" if eps <= 255 else ""
        raise ValueError(f"{name} = {eps:g} is outside [0, 1]: L∞ ε is in pixel units, where pixels lie in "
                         f"[0, 1]{hint}")
    if norm == "L2" and dim is not None and eps > math.sqrt(dim):
        raise ValueError(f"{name} = {eps:g} is larger than the L2 diameter of the pixel box, √{dim} = "
                         f"{math.sqrt(dim):.4g}: every image would be reachable")
    return eps


# a step past the ε-ball's diameter only lands on its boundary; a thousand ε is past any ball's diameter in
# both norms at every ε a paper uses, and far below where float32 overflows (‖α·g/‖g‖‖² near 3e38)
MAX_STEP_RATIO = 1000.0


def check_step_size(alpha, eps: float, steps: int, name: str = "alpha", force: bool = False) -> float:
    """A finite step size > 0, and <= ε unless ``force`` (a bigger step jumps across the ε-ball)."""
    alpha = parse_number(alpha, name)
    if not math.isfinite(alpha):
        raise ValueError(f"{name} (the step size) must be a finite number, got {alpha}")
    if steps > 0 and eps > 0 and alpha <= 0:
        raise ValueError(f"{name} (the step size) must be > 0, got {alpha}: a zero step would report clean accuracy "
                         "as robust accuracy")
    if alpha > eps and eps > 0 and not force:
        raise ValueError(f"{name} (the step size) = {alpha:.6g} is larger than eps = {eps:.6g}: every step would jump "
                         "across the ε-ball; pass force=True (--force-step-size) if that is meant")
    if eps > 0 and alpha > MAX_STEP_RATIO * eps:
        raise ValueError(f"{name} (the step size) = {alpha:.6g} is more than {MAX_STEP_RATIO:g} × eps = {eps:.6g}, even "
                         f"with force: no step that large does anything a step of 2·eps does not, and in float32 it "
                         f"overflows, so the attack would return its inputs unchanged. Use at most "
                         f"{MAX_STEP_RATIO * eps:.6g}")
    return alpha


def check_positive(name: str, value, allow_zero: bool = True) -> None:
    check_float(name, value, min=0.0, min_open=not allow_zero)


# --------------------------------------------------------------------------- names

def _key(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def resolve_name(kind: str, value, valid: Iterable[str], aliases: Optional[Mapping[str, str]] = None) -> str:
    """The canonical spelling of ``value`` among ``valid`` (case-insensitive, ``_`` = ``-``, aliases allowed).

    An unknown name raises :class:`UnknownNameError`, on one line: the closest names and the whole list."""
    valid = list(valid)
    listing = f"valid {_plural(kind)}: {', '.join(sorted(valid))}"
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a name (str), got {type(value).__name__}; {listing}")
    table = {_key(v): v for v in valid}
    for alias, target in (aliases or {}).items():
        table.setdefault(_key(alias), target)
    key = _key(value)
    if key in table:
        return table[key]
    close = list(dict.fromkeys(table[c] for c in difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)))
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise UnknownNameError(f"unknown {kind} {value!r}{hint}; {listing}")


def as_names(value, kind: str, valid: Iterable[str]) -> list[str]:
    """A list of names from a list or a comma-separated string; an empty list is an error."""
    if isinstance(value, str):
        value = [v for v in (t.strip() for t in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{_plural(kind)} must be a list of names or a comma-separated string, got "
                        f"{type(value).__name__}")
    if not value:
        raise ValueError(f"{_plural(kind)} is empty: name at least one {kind} (valid: {', '.join(sorted(valid))})")
    return list(value)


# --------------------------------------------------------------------------- tensors

def check_images(x: torch.Tensor, name: str = "x", channels: Optional[int] = None) -> None:
    """x must be a float (B, C, H, W) tensor of finite pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor of pixels in [0, 1], got dtype {x.dtype} "
                        "(convert uint8 images with x.float() / 255)")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)} ({x.dim()} dims)")
    if channels is not None and x.shape[1] != channels:
        hint = " (channels-last data? pass x.permute(0, 3, 1, 2))" if x.shape[-1] == channels else ""
        raise ValueError(f"{name} has {x.shape[1]} channels but the model expects {channels}{hint}")
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite pixels")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        hint = " (it looks like 0-255 pixels: divide by 255)" if hi > 1.5 else \
            " (it looks normalised: pass [0,1] pixels; normalisation belongs inside the model)" if lo < 0 else ""
        raise ValueError(f"{name} must hold pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_labels(y: torch.Tensor, batch: int, num_classes: Optional[int] = None, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}"
                        + (" (one-hot or probabilities? pass y.argmax(1))" if y.dim() == 2 else ""))
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the images, got {tuple(y.shape)}")
    if y.numel() and num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must be class indices in [0, {num_classes - 1}], "
                         f"got values in [{y.min().item()}, {y.max().item()}]")


def model_device(model: nn.Module) -> Optional[torch.device]:
    """Where the model's parameters (or buffers) live; None for a model without any."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def check_same_device(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    device = model_device(model)
    if device is not None and device != x.device and not (device.type == x.device.type == "cpu"):
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {device}: move one of them "
                         f"(e.g. {name}.to('{device}'))")


def logits_of(output, where: str = "the model") -> torch.Tensor:
    """The (B, K) logits a model returned; a tuple or dict is refused with how to adapt it."""
    if isinstance(output, torch.Tensor):
        if output.dim() != 2:
            raise ValueError(f"{where} must return logits of shape (B, K), got {tuple(output.shape)}")
        # bf16 autocast (the fast path): decisions and losses are taken in fp32
        return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output
    kind = type(output).__name__
    if isinstance(output, (tuple, list)):
        how = "sirobust.models.SelectOutput(model, 0) if the logits come first"
    elif isinstance(output, Mapping):
        how = f"sirobust.models.SelectOutput(model, {next(iter(output), 'logits')!r}) with the key of the logits"
    else:
        how = "a wrapper module whose forward returns the logits tensor"
    raise TypeError(f"{where} returned a {kind}, not a logits tensor (B, K); wrap it: {how}")


def model_channels(model: nn.Module) -> Optional[int]:
    """Input channels the model expects, when it says (zoo models do)."""
    norm = getattr(model, "normalize", None)
    mean = getattr(norm, "mean", None)
    return int(mean.shape[1]) if isinstance(mean, torch.Tensor) and mean.dim() == 4 else None
