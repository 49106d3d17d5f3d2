"""The computations and plots behind the paper's Figs. 3, 4 and 5.

* Fig. 3 (Sec. 5.4.3, point 3): the input loss surface ``CE(x + δ1·v + δ2·r)`` of an AT-SI model around
  test images, ``v`` the PGD-10 direction and ``r`` a random one. A smooth surface says the robustness
  gain is not gradient obfuscation. :func:`input_loss_surface`, :func:`plot_input_loss_surface`.
* Fig. 4 (Sec. 5.4.3, point 4): the weight loss surface of Wu, Xia & Wang 2020 ("Adversarial weight
  perturbation helps robust generalization"): the PGD-10 loss as the weights move along a random,
  filter-normalised direction (Li et al. 2018, "Visualizing the loss landscape of neural nets"); flatter
  for TRADES-SI than TRADES. :func:`weight_loss_surface`, :func:`weight_loss_surfaces`,
  :func:`plot_weight_loss_surface`.
* Fig. 5 (Sec. 5.5.2): histograms of ``cos θ_y`` (penultimate features vs the true class's last-layer
  weight) on PGD-10 examples; TRADES-SI's lie higher than TRADES'. :func:`cos_theta_y`,
  :func:`cos_theta_histograms`, :func:`plot_cos_histogram`.

The computations return plain JSON-able dicts (save them with :func:`sirobust.io.write_json`); the
plots write PNG and PDF atomically and return a :class:`~sirobust.experiments.plotting.SavedFigure`.
Nothing here touches the global RNG (every draw comes from a generator or keyed noise derived from
``seed``), the caller's tensors, or the model: its weights are restored bit for bit and every module's
train/eval mode is put back.

"PGD-10" is the attack of Sec. 5.1 with 10 steps: L∞ ball of radius ε, step ε/4, uniform random start,
CE loss. Here every example takes all 10 steps (no early stop at the first misclassified iterate), so the
points are the loss maximisers the figures are about and do not depend on when each example crossed the
decision boundary. Random starts are keyed on the examples' dataset indices
(:class:`~sirobust.rng.KeyedNoise`), so results do not depend on the batch size, and every model and every
weight perturbation of Fig. 4 sees the same starts.

Example::

    fig3 = input_loss_surface(model, load_dataset("cifar10", "test"), eps=8/255, n_images=10)
    plot_input_loss_surface(fig3, "fig3.png", title="CIFAR-10, ResNet18 AT-SI, ε = 8/255")
    fig5 = cos_theta_histograms({"TRADES": trades, "TRADES-SI": trades_si}, test_set, eps=8/255, n=1000)
    plot_cos_histogram(fig5, "fig5.png", title="CIFAR-10, ResNet18, PGD-10, ε = 8/255")
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..attacks.base import default_eps
from ..checks import check_int, model_device
from ..fastpath import frozen_parameters
from ..features import forward_with_features
from ..io import PathLike
from ..losses import cosine_logits
from ..metrics import eval_mode
from ..provenance import model_description
from ..rng import generator, stream_key
from .plotting import SavedFigure, new_figure, save_figure

Log = Optional[Callable[[str], None]]

# axis texts, shared by the plots and the tests that read them back
DELTA1_LABEL = "δ1 (along the PGD-10 direction)"
DELTA2_LABEL = "δ2 (random direction)"
LOSS_LABEL = "cross-entropy loss"
WEIGHT_DELTA_LABEL = "δ (step along a random filter-normalised weight direction)"
WEIGHT_LOSS_LABEL = "adversarial loss change (PGD-10 CE)"
COS_LABEL = "cos θ_y on PGD-10 examples"
COUNT_LABEL = "number of examples"


# ---------------------------------------------------------------------------------------- shared pieces

def examples(data, n: Optional[int] = None, indices: Optional[Sequence[int]] = None):
    """(x float32 in [0, 1], y int64, dataset indices, dataset name) of the first ``n`` examples of ``data``
    (or those at ``indices``), on the CPU, as new tensors. ``data``: (x, y) tensors or an ImageDataset."""
    from ..evaluation_inputs import as_tensors  # the package's one reading of "a dataset"

    x, y, name, _split = as_tensors(data)
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= len(y):
            raise ValueError(f"indices must be non-empty and lie in [0, {len(y)}), got {list(indices)[:10]}")
    else:
        n = len(y) if n is None else check_int("n", n, min=1)
        idx = torch.arange(min(n, len(y)))
    x = x[idx]  # advanced indexing copies: the caller's tensor is never written
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    return x, y[idx].long(), idx, name


def _device(model: nn.Module) -> torch.device:
    return model_device(model) or torch.device("cpu")


def _eps(model: nn.Module, eps) -> float:
    eps = default_eps(model, "Linf", eps)
    if eps <= 0:
        raise ValueError(f"eps must be > 0 for a figure (the attack and the grid span the ε-ball), got {eps}")
    return eps


def pgd10(model: nn.Module, eps: float, steps: int = 10, alpha: Optional[float] = None, seed: int = 0) -> PGD:
    """The PGD-10 of the figures: CE, step ε/4, random start, all ``steps`` steps, the model as given (fp32)."""
    return PGD(model, eps=eps, alpha=eps / 4 if alpha is None else alpha, steps=steps, loss="ce",
               random_start=True, early_stop=False, seed=seed, precision="fp32")


def pgd_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, keys: Optional[torch.Tensor] = None,
                 steps: int = 10, alpha: Optional[float] = None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """PGD-10 points for (x, y), on ``x``'s device; ``keys`` (dataset indices, default 0..B-1) key each
    example's random start, so a point depends on its example and ``seed``, not on the batching."""
    keys = torch.arange(len(y)) if keys is None else torch.as_tensor(keys, dtype=torch.int64)
    attack = pgd10(model, eps, steps, alpha, seed)
    device = _device(model)
    out = []
    with frozen_parameters(model):  # input gradients only: no weight-gradient work or memory
        for s in range(0, len(y), batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            out.append(attack(xb, yb, keys=keys[s:s + batch_size].to(device)).to(x.device))
    return torch.cat(out) if out else x.clone()


@torch.no_grad()
def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example CE loss and correctness of ``model`` (as it is: the caller sets the mode), on the CPU."""
    device = _device(model)
    losses, correct = [], []
    for s in range(0, len(y), batch_size):
        xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        logits = forward_with_features(model, xb, need_features=False).logits.float()
        losses.append(F.cross_entropy(logits, yb, reduction="none").cpu())
        correct.append((logits.argmax(1) == yb).cpu())
    return torch.cat(losses), torch.cat(correct)


def symmetric_grid(radius: float, points: int) -> list[float]:
    """``points`` values evenly spaced on [-radius, radius], with the ends exactly ±radius and, for an odd
    count, the middle exactly 0 (a linspace in floating point may miss 0 by a rounding error)."""
    points = check_int("points", points, min=2)
    return [radius * (2 * i - (points - 1)) / (points - 1) for i in range(points)]


def _provenance(model: nn.Module, dataset: Optional[str]) -> dict:
    return {"model": model_description(model), "dataset": dataset}


# ----------------------------------------------------------------------------- Fig. 3: input loss surface

def surface_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       keys: Optional[torch.Tensor] = None, steps: int = 10, alpha: Optional[float] = None,
                       seed: int = 0) -> dict:
    """The two directions of Fig. 3 for each image, and the PGD point (tensors shaped like ``x``).

    * ``v``: the PGD-10 perturbation ``x_pgd − x`` divided by its own L∞ norm (per image), so ``‖v‖∞ = 1``
      and ``x + ε·v`` is the PGD-10 point whenever the perturbation reaches the ball's surface
      (``‖x_pgd − x‖∞ = ε``, reported as ``pgd_linf``; sign steps from a random start virtually always get
      there). A zero perturbation gives ``v = 0``.
    * ``r``: a Rademacher vector (entries ±1, so ``‖r‖∞ = 1`` too), drawn from a generator seeded by a
      stream of ``seed`` distinct from the attack's random start.
    * ``x_pgd``: the PGD-10 points themselves.
    """
    x = x.detach()
    x_pgd = pgd_examples(model, x, y, eps, keys, steps, alpha, seed, batch_size=len(y))
    delta = x_pgd - x
    size = delta.flatten(1).abs().amax(1).view(-1, *[1] * (x.dim() - 1))
    v = torch.where(size > 0, delta / size.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(delta))
    g = generator(stream_key(seed, "fig3/random-direction"))
    # drawn on the CPU, then moved: the same r on every device
    r = (2 * torch.randint(0, 2, tuple(x.shape), generator=g) - 1).to(x.dtype).to(x.device)
    return {"v": v, "r": r, "x_pgd": x_pgd}


def surface_points(x: torch.Tensor, v: torch.Tensor, r: torch.Tensor, delta1, delta2,
                   eps: Optional[float] = None) -> torch.Tensor:
    """``clip01(x + δ1·v + δ2·r)``, first projected onto the ε-ball around ``x`` when ``eps`` is given.

    ``delta1`` and ``delta2`` are numbers or tensors broadcasting against ``x`` (shaped (G, 1, 1, 1, 1, 1)
    and (1, G, 1, 1, 1, 1) they give the whole G × G grid at once). With ``‖v‖∞ = ‖r‖∞ = 1`` a point on
    either axis of the grid is inside the ball already (the projection changes nothing there); only off the
    axes can ``|δ1| + |δ2|`` exceed ε, up to 2ε at the corners, and the projection keeps those points in the
    threat model the figure is about.
    """
    d1 = torch.as_tensor(delta1, dtype=x.dtype, device=x.device)
    d2 = torch.as_tensor(delta2, dtype=x.dtype, device=x.device)
    p = x + d1 * v + d2 * r
    if eps is not None:
        p = torch.minimum(torch.maximum(p, x - eps), x + eps)
    return p.clamp(0, 1)


def input_loss_surface(model: nn.Module, data, eps: Optional[float] = None, n_images: int = 10, grid: int = 21,
                       seed: int = 0, steps: int = 10, alpha: Optional[float] = None, project: bool = True,
                       indices: Optional[Sequence[int]] = None, batch_size: int = 512, log: Log = None) -> dict:
    """Fig. 3 (paper Sec. 5.4.3): the CE loss of ``model`` around each of ``n_images`` test images.

    For image ``x_k`` (label ``y_k``) and every ``δ1, δ2`` on a ``grid × grid`` lattice over [-ε, ε]²,
    ``loss[k][i][j] = CE(model(clip01(x_k + δ1[i]·v_k + δ2[j]·r_k)), y_k)`` with the model in eval mode,
    ``v_k`` the L∞-normalised PGD-10 perturbation of ``x_k`` and ``r_k`` a random ±1 vector (see
    :func:`surface_directions`). With ``project`` (default) each point is first projected onto the ε-ball
    around ``x_k``: on the axes this changes nothing, and off them it keeps the surface within the threat
    model (the paper's formula reaches 2ε at the corners; ``project=False`` plots it literally).

    ``grid`` must be odd, so that (0, 0) (the clean image) is on the lattice. Returns::

        {"figure": "fig3", "eps", "grid", "delta1": [G], "delta2": [G],
         "loss": [k][G][G] (δ1 rows, δ2 columns), "indices", "labels", "clean_correct": [k] (bool),
         "clean_loss": [k], "pgd_loss": [k] (CE at the PGD-10 point), "pgd_linf": [k] (‖x_pgd − x‖∞),
         "direction_v", "direction_r", "projected", "steps", "alpha", "seed", "model", "dataset"}
    """
    eps = _eps(model, eps)
    grid = check_int("grid", grid, min=3)
    if grid % 2 == 0:
        raise ValueError(f"grid must be odd so that δ = 0 (the clean image) is on it, got {grid}")
    x, y, idx, name = examples(data, n_images, indices)
    deltas = symmetric_grid(eps, grid)
    device = _device(model)
    with eval_mode(model):
        x = x.to(device)
        dirs = surface_directions(model, x, y.to(device), eps, idx, steps, alpha, seed)
        v, r, x_pgd = dirs["v"], dirs["r"], dirs["x_pgd"]
        clean_loss, clean_ok = _ce(model, x, y, batch_size)
        pgd_loss, _ = _ce(model, x_pgd, y, batch_size)
        d = torch.tensor(deltas, dtype=x.dtype, device=device)
        d1 = d.view(-1, 1, *[1] * x.dim())  # (G, 1, 1, C, H, W) against x_k of shape (1, C, H, W):
        d2 = d.view(1, -1, *[1] * x.dim())  # the points come out as (G, G, 1, C, H, W), δ1 first
        surfaces = []
        for k in range(len(y)):
            pts = surface_points(x[k:k + 1], v[k:k + 1], r[k:k + 1], d1, d2, eps if project else None)
            loss = _ce(model, pts.reshape(grid * grid, *x.shape[1:]), y[k].repeat(grid * grid), batch_size)[0]
            surfaces.append(loss.view(grid, grid).tolist())
            if log:
                log(f"fig3: image {k + 1}/{len(y)} (index {int(idx[k])}): clean CE {clean_loss[k]:.4g}, "
                    f"PGD-10 CE {pgd_loss[k]:.4g}, surface max {loss.max():.4g}")
    linf = (x_pgd - x).flatten(1).abs().amax(1)
    return {"figure": "fig3", "eps": eps, "grid": grid, "delta1": deltas, "delta2": list(deltas), "loss": surfaces,
            "indices": idx.tolist(), "labels": y.tolist(), "clean_correct": clean_ok.tolist(),
            "clean_loss": clean_loss.tolist(), "pgd_loss": pgd_loss.tolist(), "pgd_linf": linf.cpu().tolist(),
            "direction_v": "PGD-10 perturbation x_pgd - x divided by its L-inf norm (per image)",
            "direction_r": "Rademacher (+-1 entries), generator seeded from seed",
            "projected": bool(project), "steps": steps, "alpha": eps / 4 if alpha is None else alpha, "seed": seed,
            **_provenance(model, name)}


def plot_input_loss_surface(result: dict, path: PathLike, title: Optional[str] = None, cols: int = 5,
                            max_images: Optional[int] = None) -> SavedFigure:
    """Fig. 3: one 3-D surface per image (``cols`` per row), δ1 and δ2 in units of 1/255. ``title`` (the
    suptitle) should name the dataset, the model and ε; written as PNG and PDF."""
    from matplotlib.ticker import FormatStrFormatter
    surfaces = result["loss"][:max_images] if max_images else result["loss"]
    k = len(surfaces)
    cols = max(1, min(cols, k))
    rows = math.ceil(k / cols)
    fig = new_figure((3.6 * cols, 3.6 * rows + 0.6))
    d1 = np.asarray(result["delta1"]) * 255  # ε = 8/255 reads as 8 on the axes
    d2 = np.asarray(result["delta2"]) * 255
    D1, D2 = np.meshgrid(d1, d2, indexing="ij")  # loss[i][j] is at (delta1[i], delta2[j])
    for n, z in enumerate(surfaces):
        ax = fig.add_subplot(rows, cols, n + 1, projection="3d")
        ax.plot_surface(D1, D2, np.asarray(z), cmap="viridis", linewidth=0, antialiased=True)
        ax.set_xlabel(DELTA1_LABEL + ", in 1/255", fontsize=7, labelpad=2)
        ax.set_ylabel(DELTA2_LABEL + ", in 1/255", fontsize=7, labelpad=2)
        ax.set_zlabel(LOSS_LABEL, fontsize=7, labelpad=2)
        # the numbers themselves on the ticks: a "1e-6" multiplier at the top of the axis lands on its label
        ax.zaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.tick_params(labelsize=6, pad=0)
        ax.set_title(f"x'_{n + 1} (index {result['indices'][n]}, label {result['labels'][n]})", fontsize=8)
    fig.suptitle(title or f"Input loss surfaces, ε = {result['eps'] * 255:.3g}/255 (paper Fig. 3)")
    fig.subplots_adjust(left=0.02, right=0.96, bottom=0.06, top=0.9, wspace=0.2, hspace=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- Fig. 4: weight loss surface

def filter_normalized_direction(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random direction ``d`` over ``model``'s parameters, filter-normalised as in Li et al. 2018.

    Each parameter of 2+ dimensions (conv kernels, linear weights) gets Gaussian entries, then every
    filter ``d_i = d[i]`` (an output channel of a conv, a row of a linear layer) is rescaled to the norm of
    the same filter of the weights: ``d_i ← d_i · ‖w_i‖ / ‖d_i‖``. So the step is the same size relative to
    every filter, and the scale invariance of ReLU nets with batch norm cannot distort the plot. Biases
    and batch-norm parameters (1-D) get ``d = 0``, as Li et al. do. Draws come from a CPU generator seeded
    with ``seed`` in the order of ``named_parameters()``: two models of the same architecture get the same
    pattern before normalisation. Returns {parameter name: tensor like the parameter}.
    """
    g = generator(seed)
    out = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
            continue
        d = torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
        w = p.detach().to("cpu", torch.float64)
        w_norm = w.reshape(p.shape[0], -1).norm(dim=1)
        d_norm = d.reshape(p.shape[0], -1).norm(dim=1)
        d = d * (w_norm / (d_norm + 1e-10)).view(-1, *[1] * (p.dim() - 1))
        out[name] = d.to(p.device, p.dtype)
    return out


def _adversarial_loss(model, x, y, idx, eps, steps, alpha, seed, batch_size) -> tuple[float, float, float]:
    """(mean PGD-10 CE, mean clean CE, PGD-10 accuracy) of ``model`` as it now is."""
    x_adv = pgd_examples(model, x, y, eps, idx, steps, alpha, seed, batch_size)
    adv, ok = _ce(model, x_adv, y, batch_size)
    clean, _ = _ce(model, x, y, batch_size)
    return adv.double().mean().item(), clean.double().mean().item(), ok.double().mean().item()


def weight_loss_surface(model: nn.Module, data, eps: Optional[float] = None, deltas: Optional[Sequence[float]] = None,
                        n: int = 1000, seed: int = 0, steps: int = 10, alpha: Optional[float] = None,
                        batch_size: int = 256, indices: Optional[Sequence[int]] = None,
                        direction: Optional[Mapping[str, torch.Tensor]] = None, direction_index: int = 0,
                        log: Log = None) -> dict:
    """Fig. 4 (paper Sec. 5.4.3, following Wu et al. 2020): the adversarial loss along a weight direction.

    For each ``δ`` in ``deltas`` (default 21 points on [-1, 1]) the weights are set to ``w + δ·d``, ``d``
    from :func:`filter_normalized_direction` (seeded from ``seed`` and ``direction_index``, the ``direction_index``-th
    random direction of that seed, or given as ``direction``), PGD-10
    examples are generated against *that* perturbed model, and their mean CE over the first ``n`` images
    is the adversarial loss. ``loss_change`` is that minus the loss at δ = 0 (what the paper plots);
    computed separately when 0 is not among ``deltas``. The weights are restored bit for bit afterwards,
    even on an error, and the model's modes too (it runs in eval mode: batch-norm statistics never move).

    Returns {"figure": "fig4", "deltas", "loss", "loss_change", "clean_loss", "robust_accuracy",
    "loss_at_zero", "n", "eps", "steps", "alpha", "seed", "direction", "model", "dataset"}.
    """
    eps = _eps(model, eps)
    deltas = [float(d) for d in (symmetric_grid(1.0, 21) if deltas is None else deltas)]
    if not deltas or not all(math.isfinite(d) for d in deltas):
        raise ValueError(f"deltas must be a non-empty list of finite numbers, got {deltas}")
    x, y, idx, name = examples(data, n, indices)
    params = dict(model.named_parameters())
    # direction 0 keeps the stream it always had, so a one-direction figure draws the direction it always drew
    stream = "fig4/weight-direction" + (f"/{direction_index}" if direction_index else "")
    if direction is None:
        direction = filter_normalized_direction(model, stream_key(seed, stream))
    elif set(direction) - set(params) or any(direction[k].shape != params[k].shape for k in direction):
        raise ValueError("direction must map parameter names of the model to tensors of their shapes")
    moved = {k: d for k, d in direction.items() if bool(d.ne(0).any())}  # parameters that actually move
    saved = {k: params[k].detach().clone() for k in moved}
    losses, clean, acc = [], [], []

    def set_weights(delta: float) -> None:
        with torch.no_grad():
            for k, d in moved.items():
                # δ = 0 copies the saved weights themselves: w + 0·d could turn a -0.0 into +0.0
                params[k].copy_(saved[k] if delta == 0 else saved[k] + delta * d.to(saved[k]))

    with eval_mode(model):
        try:
            for delta in deltas:
                set_weights(delta)
                a, c, r = _adversarial_loss(model, x, y, idx, eps, steps, alpha, seed, batch_size)
                losses.append(a)
                clean.append(c)
                acc.append(r)
                if log:
                    log(f"fig4: δ = {delta:+.3f}: PGD-10 CE {a:.4f}, clean CE {c:.4f}, PGD-10 accuracy {100 * r:.2f}%")
            if 0.0 in deltas:
                at_zero = losses[deltas.index(0.0)]
            else:
                set_weights(0.0)
                at_zero = _adversarial_loss(model, x, y, idx, eps, steps, alpha, seed, batch_size)[0]
        finally:
            set_weights(0.0)
    return {"figure": "fig4", "deltas": deltas, "loss": losses, "loss_change": [v - at_zero for v in losses],
            "clean_loss": clean, "robust_accuracy": acc, "loss_at_zero": at_zero, "n": len(y), "eps": eps,
            "steps": steps, "alpha": eps / 4 if alpha is None else alpha, "seed": seed,
            "direction": {"kind": "gaussian, filter-normalised (Li et al. 2018); biases and batch norm: 0",
                          "perturbed_parameters": sorted(moved), "seed_stream": stream},
            **_provenance(model, name)}


def weight_loss_surfaces(models: Mapping[str, nn.Module], data, eps: Optional[float] = None, log: Log = None,
                         directions: int = 1, **kw) -> dict:
    """:func:`weight_loss_surface` for several models (label -> model) with the same seed, so models of one
    architecture move along the same direction pattern and see the same examples and random starts.

    One random direction is one draw: with ``directions`` > 1 each model is also moved along the 2nd, 3rd, ...
    direction of the seed (``direction_index`` 1, 2, ...; the same draws for every model, each filter-normalised
    to its own weights), so "flatter" can be judged over several directions, paired draw by draw (:func:`rise`).
    The draws depend on ``seed`` alone: models of several training seeds, given the same ``seed``, share them.
    Returns {"figure": "fig4", "labels": [...], "deltas", "eps", "models": {label: result along direction 0},
    "more_directions": [{label: result along direction j} for j = 1 .. directions - 1]}."""
    if not models:
        raise ValueError("models is empty: give at least one {label: model}")
    if directions < 1:
        raise ValueError(f"directions must be at least 1, got {directions}")
    if directions > 1 and kw.get("direction") is not None:
        raise ValueError("direction is one given direction: with directions > 1 each is drawn from the seed; give "
                         "one or the other")
    out, more = {}, [{} for _ in range(directions - 1)]
    for label, model in models.items():
        for j in range(directions):
            if log:
                log(f"fig4: {label}" + (f", direction {j + 1} of {directions}" if directions > 1 else ""))
            result = weight_loss_surface(model, data, eps, log=log, direction_index=j, **kw)
            (out if j == 0 else more[j - 1])[label] = result
    first = next(iter(out.values()))
    return {"figure": "fig4", "labels": list(out), "deltas": first["deltas"], "eps": first["eps"], "models": out,
            "more_directions": more}


def rise(result: Mapping) -> float:
    """How fast the adversarial loss rises along one direction: the mean of ``loss_change`` over the offsets
    δ ≠ 0 (an area above the loss at δ = 0, for a grid symmetric about it). Smaller is flatter, the paper's
    Fig. 4 claim for TRADES-SI."""
    changes = [c for d, c in zip(result["deltas"], result["loss_change"]) if d != 0]
    if not changes:
        raise ValueError("no offset δ ≠ 0 to measure a rise along")
    return sum(changes) / len(changes)


def _by_label(result: dict) -> dict:
    """{label: per-model result} of a several-model result, or of one model's result (its model name)."""
    return result["models"] if "models" in result else {result.get("model") or "model": result}


def plot_weight_loss_surface(result: dict, path: PathLike, title: Optional[str] = None,
                             key: str = "loss_change") -> SavedFigure:
    """Fig. 4: the adversarial loss change (``key="loss"``: the loss itself) against δ, one line per model,
    on one axes; ``result`` from :func:`weight_loss_surfaces` (or one :func:`weight_loss_surface`)."""
    fig = new_figure((6, 4))
    ax = fig.add_subplot()
    for label, r in _by_label(result).items():
        ax.plot(r["deltas"], r[key], marker="o", markersize=3, label=label)
    ax.set_xlabel(WEIGHT_DELTA_LABEL)
    ax.set_ylabel(WEIGHT_LOSS_LABEL if key == "loss_change" else "adversarial loss (PGD-10 CE)")
    ax.set_title(title or "Weight loss surface (paper Fig. 4)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ Fig. 5: cos θ_y histogram

def cos_theta_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                     head=None) -> torch.Tensor:
    """cos θ_y = W_y·z / (‖W_y‖‖z‖) for each (x, y), bias ignored (paper Sec. 4.2), on the CPU, in [-1, 1]."""
    device = _device(model)
    out = []
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            cos = cosine_logits(forward_with_features(model, xb, head=head))  # (B, K)
            out.append(cos.gather(1, yb.view(-1, 1)).squeeze(1).cpu())
    # a unit-vector dot product can round past ±1 by an ulp; a cosine cannot
    return torch.cat(out).clamp(-1, 1)


def cos_theta_y(model: nn.Module, data, eps: Optional[float] = None, n: int = 1000, seed: int = 0, bins: int = 40,
                steps: int = 10, alpha: Optional[float] = None, batch_size: int = 256,
                indices: Optional[Sequence[int]] = None, head=None) -> dict:
    """Fig. 5 (paper Sec. 5.5.2): the distribution of cos θ_y on PGD-10 examples of ``n`` test images.

    ``z`` are the penultimate features of the PGD-10 point and ``W_y`` the true class's row of the last
    linear layer (:func:`~sirobust.features.forward_with_features`; name another layer with ``head``).
    Returns {"values": [n], "bin_edges": [bins + 1] over [-1, 1], "counts": [bins] (numpy's convention: the
    last bin holds 1.0), "mean", "median", "robust_accuracy", "n", "eps", "steps", "alpha", "seed",
    "model", "dataset"}.
    """
    eps = _eps(model, eps)
    bins = check_int("bins", bins, min=1)
    x, y, idx, name = examples(data, n, indices)
    with eval_mode(model):
        x_adv = pgd_examples(model, x, y, eps, idx, steps, alpha, seed, batch_size)
        cos = cos_theta_values(model, x_adv, y, batch_size, head)
        _, ok = _ce(model, x_adv, y, batch_size)
    values = cos.double().numpy()
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts, _ = np.histogram(values, bins=edges)
    return {"figure": "fig5", "values": values.tolist(), "bin_edges": edges.tolist(), "counts": counts.tolist(),
            "mean": float(values.mean()), "median": float(np.median(values)),
            "robust_accuracy": ok.double().mean().item(), "n": len(y), "eps": eps, "steps": steps,
            "alpha": eps / 4 if alpha is None else alpha, "seed": seed, **_provenance(model, name)}


def cos_theta_histograms(models: Mapping[str, nn.Module], data, eps: Optional[float] = None, log: Log = None,
                         **kw) -> dict:
    """:func:`cos_theta_y` for several models (label -> model) on the same images, random starts and bins.
    Returns {"figure": "fig5", "labels", "bin_edges", "eps", "models": {label: result}}."""
    if not models:
        raise ValueError("models is empty: give at least one {label: model}")
    out = {}
    for label, model in models.items():
        out[label] = cos_theta_y(model, data, eps, **kw)
        if log:
            log(f"fig5: {label}: mean cos θ_y {out[label]['mean']:.4f}, median {out[label]['median']:.4f}")
    first = next(iter(out.values()))
    return {"figure": "fig5", "labels": list(out), "bin_edges": first["bin_edges"], "eps": first["eps"], "models": out}


def plot_cos_histogram(result: dict, path: PathLike, title: Optional[str] = None) -> SavedFigure:
    """Fig. 5: overlaid histograms of cos θ_y, one per model (translucent bars on the shared bins, in the
    order of ``result["labels"]``); ``result`` from :func:`cos_theta_histograms` (or one :func:`cos_theta_y`)."""
    fig = new_figure((6, 4))
    ax = fig.add_subplot()
    for label, r in _by_label(result).items():
        edges = np.asarray(r["bin_edges"])
        ax.bar(edges[:-1], r["counts"], width=np.diff(edges), align="edge", alpha=0.55, label=label)
    ax.set_xlim(-1, 1)
    ax.set_xlabel(COS_LABEL)
    ax.set_ylabel(COUNT_LABEL)
    ax.set_title(title or "cos θ_y on PGD-10 examples (paper Fig. 5)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
