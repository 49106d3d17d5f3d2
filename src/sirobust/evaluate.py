"""Clean accuracy, accuracy under each attack, and the per-example worst case.

Each attack is run on every clean-correct example (so each column of the
report stands alone, as in the paper's tables); the worst case is the
per-example AND over all attacks (AutoAttack's notion: a point is robust only
if no attack breaks it). Timings, the largest perturbation actually measured,
sanity flags, the resolved config, versions and the evaluated indices go in
the :class:`Report`, which round-trips through strict JSON.

Example::

    report = sirobust.evaluate(model, (x, y), attacks=["pgd", "si-pgd"], eps=8/255)
    print(report.to_markdown()); report.save("report.json")
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .attacks import Attack, build_attack
from .attacks.registry import canonical_attack_name
from .checks import check_images, check_labels, model_channels
from .threat import make_threat
from .io import PathLike, atomic_write_text, dumps_json
from .modes import model_mode
from .provenance import environment_info
from .sanity import run_checks

def _tolerance(dtype: torch.dtype) -> float:
    """Float slack when checking ‖δ‖ ≤ ε: rounding of the pixel dtype (1e-6 for float32)."""
    return max(1e-6, 4 * torch.finfo(dtype).eps)


@dataclass
class AttackResult:
    name: str
    robust_acc: float
    n_robust: int
    seconds: float
    max_perturbation: float
    params: dict
    robust: list = field(default_factory=list)  # per evaluated example: still correct after this attack


@dataclass
class Report:
    n: int
    clean_acc: float
    attacks: dict            # name -> AttackResult
    worst_case_acc: float
    worst_case_robust: list  # per example: correct under every attack
    max_perturbation: float
    eps: float
    norm: str
    indices: list
    config: dict
    flags: list
    environment: dict
    clean_correct: list = field(default_factory=list)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    def to_json(self) -> str:
        return dumps_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = dict(d)
        d["attacks"] = {k: AttackResult(**v) for k, v in d["attacks"].items()}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: PathLike) -> "Report":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: PathLike, markdown: bool = True) -> Path:
        """Strict JSON written atomically; with ``markdown`` a ``.md`` table beside it."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        if markdown:
            atomic_write_text(path.with_suffix(".md"), self.to_markdown())
        return path

    def to_markdown(self) -> str:
        lines = ["# Robustness report", "",
                 f"{self.n} examples, {self.norm} ε = {self.eps:.6g}; model: {self.config.get('model_description', '-')}", "",
                 "| attack | robust accuracy (%) | seconds | max ‖δ‖ |", "|---|---:|---:|---:|",
                 f"| clean | {100 * self.clean_acc:.2f} | | |"]
        for r in self.attacks.values():
            lines.append(f"| {r.name} | {100 * r.robust_acc:.2f} | {r.seconds:.1f} | {r.max_perturbation:.6g} |")
        lines.append(f"| **worst case** | **{100 * self.worst_case_acc:.2f}** | | {self.max_perturbation:.6g} |")
        triggered = [f for f in self.flags if f["triggered"]]
        lines += ["", "## Sanity flags", ""]
        lines += [f"- **{f['name']}**: {f['message']}" for f in triggered] or ["none triggered"]
        env = self.environment
        lines += ["", f"sirobust {env.get('sirobust')}, torch {env.get('torch')}, commit {env.get('git_commit')}", ""]
        return "\n".join(lines)

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [("clean", self.clean_acc, None)] + [(r.name, r.robust_acc, r.seconds) for r in self.attacks.values()]
        rows.append(("worst case", self.worst_case_acc, None))
        w = max(len(r[0]) for r in rows)
        out = [f"{'attack':<{w}}  accuracy   seconds"]
        out += [f"{name:<{w}}  {100 * acc:7.2f}%  {'' if s is None else f'{s:8.1f}'}" for name, acc, s in rows]
        return "\n".join(out)


# ------------------------------------------------------------------ data handling

def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) tensors from a tuple, an ImageDataset, or an iterable of (x, y) batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    elif isinstance(data, Iterable):
        xs, ys = zip(*[(bx, by) for bx, by in data])
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise TypeError("data must be (x, y) tensors, an ImageDataset, or an iterable of (x, y) batches; "
                        f"got {type(data).__name__}")
    # kept on the CPU and moved per batch: indices, masks and labels then always share a device
    return x.cpu(), y.cpu()


def evaluate(model: nn.Module, data, attacks: Sequence[Union[str, Attack]] = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd"),
             eps: float = 8 / 255, steps: int = 20, alpha: Optional[float] = None, restarts: int = 1,
             norm: str = "Linf", n: Optional[int] = None, batch_size: int = 256, seed: int = 0,
             device: Optional[Union[str, torch.device]] = None, progress: bool = True,
             attack_params: Optional[dict] = None, config: Optional[dict] = None, indices: Optional[Sequence[int]] = None,
             log=None) -> Report:
    """Evaluate ``model`` on ``data`` under each attack; see the module docstring.

    ``attacks`` are names (built with the shared settings) or ready :class:`Attack`
    objects (used as they are). ``n`` takes the first n examples. ``indices`` are the examples' indices in their
    dataset, recorded in the report (default 0..N-1). ``attack_params``
    maps an attack name to extra keyword arguments (e.g. ``{"si-pgd": {"scale": 30}}``).
    """
    from tqdm.auto import tqdm

    names = [a.name if isinstance(a, Attack) else canonical_attack_name(a) for a in attacks]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks lists a name twice: {list(attacks)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all, y_all = _as_tensors(data)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x_all, y_all = x_all[:n], y_all[:n]
    if x_all.dtype == torch.uint8:  # converted after the cut: only the examples evaluated become floats
        x_all = x_all.float() / 255
    check_images(x_all, "images", model_channels(model))
    check_labels(y_all, x_all.shape[0], name="labels")
    y_all = y_all.long()
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 for an evaluation, got {steps}")
    for spec in attacks:
        if isinstance(spec, Attack) and (abs(spec.eps - eps) > 1e-12 or spec.norm != make_threat(norm, eps).norm):
            raise ValueError(f"attack {spec.name!r} uses {spec.norm} ε = {spec.eps:.6g} but the evaluation is "
                             f"{norm} ε = {eps:.6g}: pass eps=/norm= to match, so that the worst case means one threat model")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    N = len(y_all)
    alpha = eps / 4 if alpha is None else alpha
    was_training = model.training
    with model_mode(model, "eval"):
        probe_x, probe_y = x_all[:min(N, 64)].to(device), y_all[:min(N, 64)].to(device)
        with torch.no_grad():
            num_classes = model(probe_x).shape[1]
        check_labels(y_all, N, num_classes, name="labels")
        flags = run_checks(model, probe_x, probe_y, was_training)
        clean = torch.empty(N, dtype=torch.bool)
        for s in range(0, N, batch_size):
            with torch.no_grad():
                clean[s:s + batch_size] = (model(x_all[s:s + batch_size].to(device)).argmax(1).cpu() == y_all[s:s + batch_size])
        worst = clean.clone()
        results: dict[str, AttackResult] = {}
        todo = clean.nonzero().squeeze(1)  # only clean-correct points can be robust
        for name, spec in zip(names, attacks):
            if isinstance(spec, Attack):
                atk = spec  # a ready attack object, used as it is
            else:
                params = dict(eps=eps, alpha=alpha, steps=steps, restarts=restarts, norm=norm, seed=seed)
                params.update((attack_params or {}).get(name, {}))
                atk = build_attack(name, model, **params)
            # what actually ran (one-step attacks fix their own steps and step size)
            params = {k: getattr(atk, k) for k in ("eps", "norm", "alpha", "steps", "restarts", "seed",
                                                   "random_start") if hasattr(atk, k)}
            if hasattr(atk, "loss"):
                params["loss"] = {"name": atk.loss.name, **atk.loss.params}
            robust = torch.zeros(N, dtype=torch.bool)
            max_delta = 0.0
            t0 = time.time()
            # disable=None: the bar turns itself off when stderr is not a terminal (CI logs)
            bar = tqdm(total=len(todo), desc=f"{name}", disable=None if progress else True, leave=False, dynamic_ncols=True)
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                x, y = x_all[idx].to(device), y_all[idx].to(device)
                x_adv = atk(x, y)
                if not torch.isfinite(x_adv).all():
                    raise RuntimeError(f"attack {name} returned non-finite pixels")
                with torch.no_grad():
                    robust[idx] = (model(x_adv).argmax(1) == y).cpu()
                max_delta = max(max_delta, atk.threat.distance(x_adv, x).max().item())
                bar.update(len(idx))
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.time() - t0
            if not max_delta <= atk.eps + _tolerance(x_all.dtype):
                raise RuntimeError(f"attack {name} left the threat model: ‖δ‖ = {max_delta} > ε = {atk.eps}")
            worst &= robust
            results[name] = AttackResult(name=name, robust_acc=robust.float().mean().item(), n_robust=int(robust.sum()),
                                         seconds=seconds, max_perturbation=max_delta, params={"repr": repr(atk), **params},
                                         robust=robust.tolist())
            if log:
                log(f"{name:<10} {100 * results[name].robust_acc:6.2f}%  ({seconds:.1f}s)")
    env = environment_info()
    cfg = {"attacks": names, "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts, "norm": norm,
           "n": N, "batch_size": batch_size, "seed": seed, "device": str(device),
           "model_description": type(model).__name__, **(config or {})}
    return Report(n=N, clean_acc=clean.float().mean().item(), attacks=results,
                  worst_case_acc=worst.float().mean().item(), worst_case_robust=worst.tolist(),
                  max_perturbation=max((r.max_perturbation for r in results.values()), default=0.0),
                  eps=eps, norm=norm, indices=list(range(N)) if indices is None else [int(i) for i in indices][:N],
                  config=cfg, flags=flags, environment=env, clean_correct=clean.tolist())
