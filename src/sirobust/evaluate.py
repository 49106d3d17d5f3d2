"""Clean accuracy, accuracy under each attack, and the per-example worst case.

Each attack is run on every clean-correct example (so each column of the
report stands alone, as in the paper's tables); the worst case is the
per-example AND over all attacks (AutoAttack's notion: a point is robust only
if no attack breaks it). Everything is checked before the first attack runs:
the arguments, every attack's fitness for the model (SI-PGD's linear head, the
classes DLR needs). Random starts are keyed per example (its index in the
dataset), so the same command gives the same per-example results for any batch
size. The :class:`~sirobust.report.Report` carries counts with 95 % intervals,
the attack that broke each example, sanity flags and the provenance of it all.

Attacks may be names, sirobust :class:`Attack` objects, torchattacks objects or
any ``(x, y) -> x_adv`` callable (optionally as a ``(name, callable)`` pair);
theirs are held to the same rules as ours, and one that leaves the threat model
is reported but not counted in the worst case.

Example::

    report = sirobust.evaluate(model, (x, y), attacks=["pgd", "si-pgd"], eps=8/255)
    print(report.table()); report.save("report.json")
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .attacks import Attack, list_attacks
from .attacks.base import default_eps, recorded_dataset
from .attacks.result import AttackOutput
from .checks import (as_names, check_images, check_int, check_labels, check_step_size, logits_of, model_channels,
                     model_device, model_dtype, parse_number)
from .distributed import Group
from .distributed import current as current_group
from .fastpath import check_precision, resolve_precision
from .interrupts import RunInterrupted
from .modes import model_mode, modules_in_train_mode
from .progress import evaluation_key
from .provenance import environment_info, model_description, precision_of, weights_identity
from .report import AttackResult, Report, accuracy
from .evaluation_cost import cost_line
from .evaluation_inputs import as_tensors, build_runners, preflight
from .runfolder import command_line, utc_now
from .sanity import (BLACK_BOX, SCALE_CHECK_EXAMPLES, check_scale_sensitivity, gives_gradients, result_flags,
                     run_checks)
from .threat import canonical_norm, make_threat

DEFAULT_ATTACKS = ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")
AttackSpec = Union[str, Attack, Callable, tuple]

__all__ = ["evaluate", "Report", "AttackResult", "DEFAULT_ATTACKS"]


def _tolerance(dtype: torch.dtype) -> float:
    """Float slack when checking ‖δ‖ ≤ ε: 1e-6 for float32 and float64; for bf16 and fp16 data (whose ‖δ‖ is
    measured in float64), half a rounding step at 1.0 (x ± ε rounded to nearest in that dtype), 0.0039 and 0.00049. (It was
    4 ulps at 1.0, 0.031 in bf16: an attack at 1.9ε of 8/255 passed.) sirobust's attacks return points
    inside the ball up to the rounding of x ± ε in the data's dtype (threat.LinfBall.project), well within this."""
    return max(1e-6, torch.finfo(dtype).eps / 2)


_RESIDENT_BYTES = 4 << 30  # evaluation sets below this stay on the GPU for the whole evaluation


def _clean_pass(model, x_all, y_all, batch_size, device, saved) -> torch.Tensor:
    done = saved.clean() if saved is not None else None
    if done is not None and len(done) == len(y_all):
        return torch.tensor(done, dtype=torch.bool)
    clean = torch.empty(len(y_all), dtype=torch.bool)
    for s in range(0, len(y_all), batch_size):
        with torch.no_grad():
            clean[s:s + batch_size] = (logits_of(model(x_all[s:s + batch_size].to(device))).argmax(1).cpu()
                                       == y_all[s:s + batch_size].cpu())
    if saved is not None:
        saved.save_clean(clean.tolist())
    return clean


def _params(atk) -> dict:
    return atk.params() if hasattr(atk, "params") else {"repr": repr(atk)}


# ------------------------------------------------------------------ the evaluation

def evaluate(model: nn.Module, data, attacks: Union[str, Sequence[AttackSpec]] = DEFAULT_ATTACKS,
             eps: Optional[Union[float, str]] = None, steps: int = 20, alpha: Optional[Union[float, str]] = None,
             restarts: int = 1, norm: str = "Linf", n: Optional[int] = None, batch_size: int = 256, seed: int = 0,
             device: Optional[Union[str, torch.device]] = None, progress: bool = True,
             attack_params: Optional[dict] = None, config: Optional[dict] = None,
             indices: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None,
             force_step_size: bool = False, provenance: Optional[dict] = None, saved=None, stop=None,
             precision: str = "auto", compile: bool = False, group: Optional[Group] = None) -> Report:
    """Evaluate ``model`` on ``data`` under each attack; see the module docstring.

    ``data``: ``(x, y)`` tensors (pixels in [0, 1], or uint8), a sirobust ``ImageDataset``, a ``TensorDataset``,
    a map-style dataset of ``(image, label)`` pairs, or an iterable of ``(x, y)`` batches such as a DataLoader.

    ``eps`` (pixel units; ``"8/255"`` accepted) defaults to the budget of the model's recorded
    dataset or of ``data``'s dataset, and is otherwise required. ``n`` takes the first n examples.
    ``indices`` are the examples' indices in their dataset: they key the random starts and are
    recorded (default 0..N-1). ``attack_params`` maps an attack name to its own keyword arguments
    (``{"si-pgd": {"scale": 30}}``). ``provenance`` adds or overrides provenance fields (the CLI
    records the weights file's sha256 and the command there). ``log`` gets the cost bound before the attacks
    start, then a line per attack as soon as it finishes. ``saved`` (an :class:`~sirobust.progress.EvaluationProgress`) keeps every
    finished batch on disk and reuses what an earlier, stopped call finished; ``stop`` (a
    :class:`~sirobust.interrupts.StopRequest`) ends the evaluation between two batches, or between two
    attacks, raising :class:`~sirobust.interrupts.RunInterrupted`; a request that comes during the last batch
    of the last attack lets the evaluation finish (the caller sees ``stop.requested``). ``precision``
    (auto, fp32, fp32-fast, bf16; :mod:`sirobust.fastpath`) is how our attacks run the model; every
    verdict is taken on the model as given, in fp32. ``compile`` runs our attacks on a ``torch.compile``d
    private copy of the model (not with ``precision="fp32"``). Under torchrun (``group``, default: the
    launcher's, :mod:`sirobust.distributed`) the batches are shared among the processes and every process
    returns the same report; ``saved`` is then rank 0's alone.
    """
    from tqdm.auto import tqdm

    # ---- every argument checked before any forward pass
    norm = canonical_norm(norm)
    x_all, y_all, data_name, data_split = as_tensors(data)
    if eps is None and recorded_dataset(model) is None and data_name is not None:
        from .data import get_dataset_info
        eps = get_dataset_info(data_name).eps_for(norm)
    eps = default_eps(model, norm, eps)
    steps = check_int("steps", steps, min=1)
    alpha = check_step_size(eps / 4 if alpha is None else parse_number(alpha, "alpha"), eps, steps, "alpha",
                            force_step_size)
    restarts = check_int("restarts", restarts, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    seed = check_int("seed", seed, min=0)
    precision = check_precision(precision)
    specs = as_names(attacks, "attack", list_attacks()) if isinstance(attacks, str) else list(attacks)
    if not specs:
        raise ValueError(f"attacks is empty: name at least one attack (valid: {', '.join(list_attacks())})")
    if n is not None:
        n = check_int("n", n, min=1)
        if n > x_all.shape[0] and log:  # not silently fewer than asked for
            log(f"n = {n}, but the data holds {x_all.shape[0]} examples: evaluating all {x_all.shape[0]}")
        x_all, y_all = x_all[:n], y_all[:n]
    if x_all.shape[0] == 0:
        raise ValueError("data has no examples to evaluate")
    if x_all.dtype == torch.uint8:  # converted after the cut: only the examples evaluated become floats
        x_all = x_all.float() / 255
    check_images(x_all, "images", model_channels(model))
    check_labels(y_all, x_all.shape[0], name="labels")
    x_all, y_all = x_all.to(model_dtype(model)), y_all.long()
    N = len(y_all)
    idx_list = list(range(N)) if indices is None else [int(i) for i in indices][:N]
    if len(idx_list) != N:
        raise ValueError(f"indices has {len(idx_list)} entries for {N} examples")
    keys_all = torch.tensor(idx_list, dtype=torch.int64)
    shared = dict(eps=eps, alpha=alpha, steps=steps, restarts=restarts, norm=norm, seed=seed, force=force_step_size,
                  precision=precision)
    runners = build_runners(specs, model, eps, norm, shared, attack_params or {})
    for atk in runners:
        if isinstance(atk, Attack) and compile:
            for part in [atk, *(a for _, a in getattr(atk, "stages", []))]:  # an ensemble's stages too
                part.compile = True
    threat = make_threat(norm, eps)
    device = torch.device(device) if device is not None else model_device(model) or torch.device("cpu")
    group = group or current_group(device.type)
    fast = resolve_precision(precision, device, compile=compile)
    if device.type == "cuda" and x_all.numel() * x_all.element_size() < _RESIDENT_BYTES:
        # the evaluation set lives on the device: no host-to-device copy per batch (CIFAR-10 test: 123 MB)
        x_all, y_all = x_all.to(device), y_all.to(device)

    was_training = modules_in_train_mode(model)  # those whose output depends on the mode
    with model_mode(model, "eval"):
        probe_x, probe_y = x_all[:min(N, 64)].to(device), y_all[:min(N, 64)].to(device)
        with torch.no_grad():
            num_classes = logits_of(model(probe_x)).shape[1]
        check_labels(y_all, N, num_classes, name="labels")
        preflight(model, runners, probe_x[:2], num_classes)
        flags = run_checks(model, probe_x, probe_y, was_training)
        black_box = {atk.name for atk in runners if atk.black_box}  # by class: a label may be "spsa[samples=64]"
        if not gives_gradients(flags):
            white = [atk.name for atk in runners if atk.name not in black_box]
            if white:
                raise ValueError(f"the model gives no input gradient, so {', '.join(white)} cannot run on it; use "
                                 f"the black-box attacks ({', '.join(BLACK_BOX)}). "
                                 + next(f["message"] for f in flags if f["name"] == "zero_gradients"))
        if saved is not None:  # the saved batches are checked against this evaluation before any is used
            saved.bind(evaluation_key(model, x_all, y_all, idx_list, batch_size, fast.precision,
                                      {"norm": norm, "eps": eps}, {atk.name: _params(atk) for atk in runners}))
        # rank 0's (it may read it from the saved progress): every process must attack the same examples
        clean = group.first(_clean_pass, model, x_all, y_all, batch_size, device, saved)
        results: dict[str, AttackResult] = {}
        todo = clean.nonzero().squeeze(1)  # only clean-correct points can be robust
        if log and group.main:  # the bound on what the attacks can cost, before they start
            line = cost_line(model, runners, x_all[:min(N, batch_size)].to(device), len(todo), num_classes, device,
                             group.world, fast)
            if line:
                log(line)
        for i, atk in enumerate(runners):
            if i and group.any(stop is not None and stop.requested):  # heard in the last batch of the one before
                raise _interrupted(stop, f"before {atk.name}")
            results[atk.name] = _run_attack(model, atk, threat, x_all, y_all, keys_all, todo, N, batch_size, device,
                                            progress, tqdm, saved, stop, group, num_classes)
            if results[atk.name].excluded:
                flags.append({"name": "attack_left_threat_model", "triggered": True, "value": atk.name,
                              "message": f"attack {atk.name!r} returned points outside the threat model or [0, 1], "
                                         f"or unusable ones ({results[atk.name].note}); its column is reported but not "
                                         "counted in the worst case."})
            if log:
                r = results[atk.name]
                lo, hi = r.ci95
                log(f"{atk.name:<14} {100 * r.robust_acc:6.2f}%  [{100 * lo:.1f}, {100 * hi:.1f}]  ({r.seconds:.1f}s)"
                    + ("  EXCLUDED: left the threat model" if r.excluded else ""))

        flags += result_flags(results, N, black_box=black_box)
        if gives_gradients(flags):
            some = todo[:SCALE_CHECK_EXAMPLES]
            flags.append(check_scale_sensitivity(model, x_all[some].to(device), y_all[some].to(device), eps, norm,
                                                 seed, precision=precision))

    worst = clean.clone()
    broken_by: list = [None if c else "clean" for c in clean.tolist()]
    for name, r in results.items():
        if r.excluded:
            continue
        robust = torch.tensor(r.robust, dtype=torch.bool)
        for i in (worst & ~robust).nonzero().squeeze(1).tolist():
            broken_by[i] = name
        worst &= robust
    env = environment_info()
    cfg = {"attacks": list(results), "eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts, "norm": norm,
           "n": N, "batch_size": batch_size, "seed": seed, "device": str(device), "precision": fast.precision,
           "model_description": type(model).__name__, **(config or {})}
    prov = {**weights_identity(model), "model": model_description(model),
            "dataset": (config or {}).get("dataset") or data_name or recorded_dataset(model),
            "split": (config or {}).get("split") or data_split,
            "examples": {"count": N, "first_index": idx_list[0], "last_index": idx_list[-1],
                         "contiguous": idx_list == list(range(idx_list[0], idx_list[0] + N))},
            "threat_model": {"norm": norm, "eps": eps, "step_size": alpha, "steps": steps, "restarts": restarts},
            "attacks": {name: r.params for name, r in results.items()},
            "seed": seed, "device": str(device), "processes": group.world, "precision": precision_of(model),
            "fast_path": {**fast.describe(), "verdicts": "the model as given, " + precision_of(model)},
            "sirobust": env["sirobust"], "torch": env["torch"], "python": env["python"], "cpu": env["cpu"],
            "threads": env["threads"], "git_commit": env["git_commit"], "command": command_line(), "utc_time": utc_now(),
            **(provenance or {})}
    clean_acc = accuracy(int(clean.sum()), N)
    worst_acc = accuracy(int(worst.sum()), N)
    return Report(n=N, clean_acc=clean_acc["fraction"], clean=clean_acc, attacks=results,
                  worst_case_acc=worst_acc["fraction"], worst_case=worst_acc, worst_case_robust=worst.tolist(),
                  broken_by=broken_by,
                  max_perturbation=max((r.max_perturbation for r in results.values() if not r.excluded), default=0.0),
                  eps=eps, norm=norm, indices=idx_list, config=cfg, flags=flags, environment=env, provenance=prov,
                  clean_correct=clean.tolist())


def _run_attack(model, atk, threat, x_all, y_all, keys_all, todo, N, batch_size, device, progress_bar,
                tqdm, saved=None, stop=None, group: Optional[Group] = None, num_classes: int = 0) -> AttackResult:
    """One attack over the clean-correct examples, its outputs checked against the evaluation's threat
    model. Ours must pass (a failure is a bug); an external attack's bad outputs are counted, noted, and
    its column excluded from the worst case. With ``saved`` (an EvaluationProgress) finished batches are
    read back and new ones written as they finish; ``stop`` (a StopRequest) ends it between batches.
    With a distributed ``group`` the batches are dealt round-robin and gathered on every process. An
    ensemble's stages are those it runs on a model with ``num_classes`` classes."""
    group = group or Group()
    robust = torch.zeros(N, dtype=torch.bool)
    stage_of = torch.full((N,), -1, dtype=torch.long)   # ensembles: the stage that broke each example
    queries = torch.zeros(N)                            # query-based attacks: queries spent per example
    distances = torch.full((N,), float("nan"), dtype=torch.float64)  # boundary searches (RayS): distance found
    max_delta, outside, broken, seconds = 0.0, 0, "", 0.0
    tol = _tolerance(x_all.dtype)
    ours = isinstance(atk, Attack)
    # disable=None: the bar turns itself off when stderr is not a terminal (CI logs); rank 0's only
    bar = tqdm(total=len(todo), desc=atk.name, disable=None if progress_bar and group.main else True, leave=False,
               dynamic_ncols=True)
    starts = list(range(0, len(todo), batch_size))
    # batches an earlier, stopped call finished (rank 0 holds them; every process learns which)
    finished = group.first(lambda: {} if saved is None else
                           {s: d for s in starts if (d := saved.batch(atk.name, s)) is not None})
    remaining = [s for s in starts if s not in finished]

    def record(s: int, done: dict) -> None:
        nonlocal max_delta, outside, broken
        idx = todo[s:s + batch_size]
        if len(done["robust"]) != len(idx):
            raise RuntimeError(f"{atk.name}: the results of batch {s // batch_size} are for {len(done['robust'])} "
                               f"examples, not {len(idx)}; the saved progress does not belong to this evaluation")
        robust[idx] = torch.tensor(done["robust"], dtype=torch.bool)
        if done.get("stages") is not None:
            stage_of[idx] = torch.tensor(done["stages"], dtype=torch.long)
        if done.get("queries") is not None:
            queries[idx] = torch.tensor(done["queries"], dtype=torch.float)
        if done.get("distances") is not None:
            distances[idx] = torch.tensor([float("inf") if v is None else v for v in done["distances"]],
                                          dtype=torch.float64)
        max_delta, outside = max(max_delta, done["max_delta"]), outside + done["outside"]
        broken = broken or done["broken"]
        bar.update(len(idx))

    for s, done in finished.items():
        record(s, done)
        seconds += done["seconds"]
    # with N processes, batch r·N + k of the remaining ones is process k's: each batch is computed exactly
    # as a single process computes it, so 1 and N processes give the same per-example results
    for r in range(0, len(remaining), group.world):
        mine = remaining[r:r + group.world][group.rank:group.rank + 1]
        done = None
        if mine:
            idx = todo[mine[0]:mine[0] + batch_size]
            done = _run_batch(model, atk, threat, x_all[idx].to(device), y_all[idx].to(device),
                              keys_all[idx].to(device), ours, tol, device)
        parts = [(p_s, p_done) for p_s, p_done in group.gather((mine[0] if mine else None, done)) if p_s is not None]
        for p_s, p_done in parts:
            if saved is not None and group.main:
                saved.save_batch(atk.name, p_s, p_done)
            record(p_s, p_done)
        seconds += max(p_done["seconds"] for _, p_done in parts)  # the processes ran side by side
        if r + group.world < len(remaining) and group.any(stop is not None and stop.requested):
            bar.close()
            raise _interrupted(stop, f"during {atk.name}")
    bar.close()
    k = int(robust.sum())
    acc = accuracy(k, N)
    note = ""
    if broken:
        note = f"returned {broken} for some batches"
    elif outside:
        note = (f"{outside} of {len(todo)} outputs outside the {threat.norm} ε-ball or [0, 1], max ‖δ‖ = "
                f"{max_delta:.6g}")
    params = {"repr": repr(atk), **_params(atk)}
    if not ours:
        note = (note + "; " if note else "") + "its randomness is its own (not keyed per example)"
    stats: dict = {}
    if len(todo) and queries[todo].sum() > 0:
        q = queries[todo]
        stats["queries"] = {"mean": q.mean().item(), "max": q.max().item()}
    if len(todo) and not distances[todo].isnan().all():
        stats["adbd"] = adbd(distances[todo])
    stages: list = []
    broken_by_stage: list = []
    plan = atk.stage_plan(num_classes) if ours else None
    if plan is not None:
        names, skipped = plan
        left = len(todo)
        for i, name in enumerate(names):
            hit = int((stage_of[todo] == i).sum())
            left -= hit
            stages.append({"name": name, "broke": hit, "robust_after": accuracy(left, N)})
        broken_by_stage = [names[int(v)] if v >= 0 else None for v in stage_of.tolist()]
        if skipped:
            stats["skipped"] = [f"{n}: {why}" for n, why in skipped]
    return AttackResult(name=atk.name, robust_acc=acc["fraction"], n_robust=k, n=N, ci95=acc["ci95"], seconds=seconds,
                        max_perturbation=max_delta, params=params, robust=robust.tolist(),
                        excluded=bool(outside or broken), note=note, stages=stages, broken_by_stage=broken_by_stage,
                        stats=stats)


def adbd(distances: torch.Tensor) -> dict:
    """RayS's average decision-boundary distance over the clean-correct examples (Chen & Gu 2020), with the
    median and how many examples had no boundary within the query budget (they are left out of the mean)."""
    found = distances[torch.isfinite(distances)]
    return {"mean": found.mean().item() if found.numel() else None,
            "median": found.median().item() if found.numel() else None,
            "found": int(found.numel()), "not_found": int(distances.numel() - found.numel())}


def _interrupted(stop, where: str) -> RunInterrupted:
    """The stop of an evaluation ``where`` ("during pgd"), once every process has saved its finished batches."""
    name = stop.name if stop is not None and stop.requested else "a stop signal to another process"
    return RunInterrupted(f"stopped by {name} {where}; every finished batch is saved",
                          stop.signum if stop is not None else None)


def _run_batch(model, atk, threat, x, y, keys, ours: bool, tol: float, device) -> dict:
    """One batch of one attack: its per-example results, as they are saved for --resume."""
    t0 = time.time()
    result = atk.perturb(x, y, keys=keys) if ours else AttackOutput(atk(x, y))
    x_adv = result.x_adv
    problem = ("shape " + str(tuple(x_adv.shape)) if x_adv.shape != x.shape
               else "non-finite pixels" if not torch.isfinite(x_adv).all() else "")
    if problem:
        if ours:
            raise RuntimeError(f"attack {atk.name!r} returned {problem} for inputs {tuple(x.shape)}")
        # those examples count as not broken by it; the column is excluded anyway
        return {"robust": [True] * len(y), "max_delta": 0.0, "outside": len(y), "broken": problem,
                "seconds": time.time() - t0}
    x_adv = x_adv.to(device=device, dtype=x.dtype)
    half = x.dtype in (torch.float16, torch.bfloat16)  # their differences rounded in their own dtype are coarse
    dist = threat.distance(x_adv.double(), x.double()) if half else threat.distance(x_adv, x)
    bad = (dist > threat.eps + tol) | (x_adv.flatten(1).amin(1) < 0) | (x_adv.flatten(1).amax(1) > 1)
    if bad.any() and ours:
        raise RuntimeError(f"attack {atk.name} left the threat model: ‖δ‖ = {dist.max().item()} > ε = {threat.eps}")
    with torch.no_grad():
        robust = (logits_of(model(x_adv)).argmax(1) == y).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"robust": robust.tolist(), "max_delta": dist.max().item(), "outside": int(bad.sum()), "broken": "",
           "seconds": time.time() - t0}
    if result.stages is not None:
        out["stages"] = result.stages.cpu().tolist()
    if result.queries is not None:
        out["queries"] = result.queries.cpu().tolist()
    if result.distances is not None:
        # JSON has no infinity: a boundary not found within the budget is stored as null
        out["distances"] = [v if math.isfinite(v) else None for v in result.distances.cpu().double().tolist()]
    return out
