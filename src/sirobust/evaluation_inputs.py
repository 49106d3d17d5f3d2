"""What an evaluation takes in, checked before any attack runs: the data as tensors, each attack ready to
run under the evaluation's threat model, and each attack's fitness for the model (:func:`sirobust.evaluate`)."""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import nn

from .attacks import Attack, build_attack, canonical_attack_name
from .attacks.external import ExternalAttack
from .features import FeatureAccessError, forward_with_features


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor, Optional[str], Optional[str]]:
    """(x, y, dataset name, split) from a tuple, an ImageDataset, a TensorDataset, a map-style dataset of
    (image, label) pairs, or an iterable of (x, y) batches (a DataLoader)."""
    name = split = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
        name, split = getattr(data, "name", None), getattr(data, "split", None)
    elif isinstance(getattr(data, "tensors", None), tuple) and len(data.tensors) == 2:  # a TensorDataset
        x, y = data.tensors
    elif (hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, Iterable)
          and not isinstance(data, (str, bytes, torch.Tensor))):
        # a map-style dataset of single (image, label) pairs (torchvision's CIFAR10 with ToTensor, say)
        if len(data) == 0:
            raise ValueError("data has no examples")
        pairs = [data[i] for i in range(len(data))]
        try:
            x, y = torch.stack([p[0] for p in pairs]), torch.as_tensor([int(p[1]) for p in pairs])
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            raise TypeError(f"data: a dataset must give (image tensor, integer label) pairs of one shape ({e})") \
                from None
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        batches = [(bx, by) for bx, by in data]
        if not batches:
            raise ValueError("data has no examples")
        xs, ys = zip(*batches)
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise TypeError("data must be (x, y) tensors, an ImageDataset, a dataset of (image, label) pairs, or an "
                        "iterable of (x, y) batches; "
                        f"got {type(data).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"data must hold tensors, got images {type(x).__name__} and labels {type(y).__name__}")
    # kept on the CPU and moved per batch: indices, masks and labels then always share a device
    return x.cpu(), y.cpu(), name, split


def build_runners(specs, model, eps, norm, shared: dict, attack_params: dict) -> list:
    """Each spec as a ready attack (ours or wrapped), with its name; names and threat models are checked
    before anything runs. A user's Attack object is never modified (a ``(name, attack)`` pair renames a copy)."""
    runners, names, unfit = [], [], []
    for spec in specs:
        name = None
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            name, spec = spec
        if isinstance(spec, str):
            key = canonical_attack_name(spec)
            try:
                runner = build_attack(key, model, overrides=attack_params.get(key), **shared)
            except FeatureAccessError as e:  # the others are still built: the message names what can run
                unfit.append((key, e))
                continue
            runner.built_from = key  # ours, just built: the name that builds it again (for the messages)
        elif isinstance(spec, Attack):
            if abs(spec.eps - eps) > 1e-12 or spec.norm != norm:
                raise ValueError(f"attack {name or spec.name!r} uses {spec.norm} ε = {spec.eps:.6g} but the evaluation "
                                 f"is {norm} ε = {eps:.6g}: pass eps=/norm= to match, so that the worst case means one "
                                 "threat model")
            runner = copy.copy(spec) if name else spec
        else:
            runner = ExternalAttack(spec, eps, norm, name=name)
        if name:
            runner.name = name
        if runner.name in names:
            raise ValueError(f"attacks lists {runner.name!r} twice; give callables distinct names with "
                             "(name, callable) pairs")
        names.append(runner.name)
        runners.append(runner)
    if unfit:
        (key, e), others = unfit[0], [k for k, _ in unfit[1:]]
        also = f" (nor can {', '.join(repr(k) for k in others)})" if others else ""
        raise FeatureAccessError(f"attack {key!r} cannot run on this model{also}: {e}"
                                 + without_them([key, *others], runners))
    return runners


def parts_reading_features(atk) -> list:
    """The attack, or the stages of an ensemble (SI-APGD inside aa-si), that take their loss from the
    penultimate features."""
    parts = [atk, *(stage for _name, stage in getattr(atk, "stages", []))]
    return [p for p in parts if getattr(getattr(p, "loss", None), "needs_features", False)]


def reads_features(atk) -> bool:
    return bool(parts_reading_features(atk))


def without_them(unfit: list, runners: list) -> str:
    """How to evaluate without the attacks that read the features: drop them, and, when the rest were all
    named, the list to pass in the API's and the command line's spelling. The user drops them: a default list
    silently weakened would be a robustness number they did not ask for."""
    rest = [r for r in runners if r.name not in unfit and not reads_features(r)]
    drop = [*unfit, *(r.name for r in runners if r.name not in unfit and reads_features(r))]
    text = f"; to evaluate without the attacks that read the features, drop {', '.join(map(repr, drop))}"
    names = [getattr(r, "built_from", None) for r in rest]
    if rest and all(names):  # an object or callable of the user's cannot be spelt as a name
        text += f": attacks={names!r} (sirobust evaluate --attacks {','.join(names)})"
    return text


def preflight(model: nn.Module, runners: list, probe: torch.Tensor, num_classes: int) -> None:
    """Fail now, not after the other attacks spent their time, if an attack cannot run on this model."""
    for atk in runners:
        loss = getattr(atk, "loss", None)
        need = {"dlr": 3, "dlr-targeted": 4}.get(getattr(loss, "name", None))
        if need and num_classes < need:  # (an ensemble skips such stages itself, and says so)
            raise ValueError(f"attack {atk.name!r} uses the {loss.name} loss, which needs at least {need} classes; "
                             f"the model has {num_classes}")
        for part in parts_reading_features(atk):
            try:
                with torch.no_grad():
                    forward_with_features(model, probe, head=getattr(part, "head", None), need_features=True)
            except FeatureAccessError as e:
                raise FeatureAccessError(f"attack {atk.name!r} cannot run on this model: {e}"
                                         + without_them([atk.name], runners)) from None
