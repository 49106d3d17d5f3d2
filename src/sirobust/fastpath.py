"""The fast path: the same attack and the same training, with less arithmetic and memory traffic.

Three levers, each a change of how the model is run, never of what is computed:

- **bf16 autocast** of the model's forward and backward (the convolutions and matrix
  products), with the loss, the perturbation, the projection and every decision kept in
  fp32: :class:`~sirobust.features.ModelOutput` and :func:`~sirobust.checks.logits_of`
  hand the losses float32 logits, and the adversarial point itself is never rounded to bf16.
- **channels_last** memory layout (NHWC), which cuDNN's and oneDNN's fastest convolutions use.
- **BatchNorm folding** for attacks on a model in eval mode: ``conv → BN`` pairs become one
  convolution, in a private copy made once per model and weights and checked against the original's
  logits before use. A zoo model's body is traced with ``torch.fx`` (our code); a user's model is never
  traced, since its forward may have side effects: only its ``nn.Sequential`` blocks are folded. An
  eval-mode BN is an affine map, so the folded model is the same function up to float rounding; its
  gradient is the same too.

On a CPU, forwards that need logits and no gradient (Square's queries) can also run the private copy's
**inference form** (:func:`inference_copy`): traced, frozen and optimised for inference by TorchScript.

The fp32 islands inside an autocast region (losses, margins, verdicts) are one context manager,
:func:`fp32_island`.

``precision`` names the mix:

========== ======================================================================
``fp32``    the reference path: the model as given, fp32, nothing changed
``fp32-fast`` channels_last and BN folding, all arithmetic fp32
``bf16``    ``fp32-fast`` plus bf16 autocast of the model
``auto``    ``bf16`` on CUDA, ``fp32-fast`` elsewhere (bf16 without AMX is slow on CPUs)
========== ======================================================================

The attack's verdict is never taken from the fast model alone: :class:`~sirobust.attacks.Attack`
checks each restart's result on the model as given, and :func:`sirobust.evaluate` counts an
example as robust only if the model as given classifies its adversarial point correctly.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .checks import resolve_name

PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16")


@dataclass(frozen=True)
class FastPath:
    """A resolved precision: what the fast path does on one device."""

    precision: str        # fp32 | fp32-fast | bf16 (never auto)
    autocast: bool        # bf16 autocast of the model
    channels_last: bool   # NHWC layout for 4-D inputs and the models we own or copy
    fold_bn: bool         # conv→BN folding for attacks on eval-mode models
    compile: bool = False  # torch.compile the attack's private copy (dynamic shapes: early stop shrinks batches)

    def describe(self) -> dict:
        return asdict(self)

    def autocast_context(self, device: torch.device, enabled: bool = True):
        """``torch.autocast`` to bf16 on ``device`` when this path autocasts (and ``enabled``), else nothing."""
        if not (self.autocast and enabled):
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the layout the fast model wants (a view or copy; the caller's tensor is untouched)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def fp32_island(device) -> torch.autocast:
    """The fp32 island: no autocast inside, on ``device`` (a torch.device or its type, "cuda"), whatever the
    caller runs under. Losses, margins and verdicts are taken there (a bf16 logit is good to about 1 %)."""
    return torch.autocast(device if isinstance(device, str) else torch.device(device).type, enabled=False)


def resolve_precision(precision: str, device, compile: bool = False) -> FastPath:
    """``precision`` (auto, fp32, fp32-fast, bf16) as what it means on ``device``; ``compile`` adds
    ``torch.compile`` of the attack's private copy (not with fp32, the model as given)."""
    name = resolve_name("precision", precision, PRECISIONS, {"float32": "fp32", "bfloat16": "bf16", "fast": "auto"})
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "fp32-fast"
    if name == "fp32":
        return FastPath("fp32", autocast=False, channels_last=False, fold_bn=False)
    return FastPath(name, autocast=name == "bf16", channels_last=True, fold_bn=True, compile=bool(compile))


def check_precision(precision: str) -> str:
    """The canonical name of ``precision`` (an error names the allowed values)."""
    return resolve_name("precision", precision, PRECISIONS, {"float32": "fp32", "bfloat16": "bf16", "fast": "auto"})


# ------------------------------------------------------------------ the attack's private model

# model -> (weights signature, fast path, the prepared copy or the model itself, why not folded)
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place through autograd-visible ops
    (tensor version counters, storage pointers). Writes through ``.data`` escape it: the probe check on
    every use catches those."""
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                 for t in (*model.parameters(), *model.buffers()))


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or getattr(m, "_backward_pre_hooks", None) for m in model.modules())


def _fold(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with every ``Conv2d → BatchNorm2d`` pair folded into one convolution.

    Traced with ``torch.fx``; every ``nn.Linear`` (and subclass, such as HE's cosine head) stays a module
    of the same name, so the attacks that read the penultimate features find the same head."""
    from torch import fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Linear) or super().is_leaf_module(m, qualname)

    module = copy.deepcopy(module)
    gm = fx.GraphModule(module, Tracer().trace(module))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if (not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1
                or type(modules.get(conv_node.target)) is not nn.Conv2d):
            continue  # the conv's raw output is used elsewhere too, or it is not a plain convolution
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # a BN without running statistics normalises by the batch even in eval mode
        parent, _, name = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fuse_conv_bn_eval(modules[conv_node.target], bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
    if _writes_only_fresh_tensors(gm, modules):  # else an in-place write could reach what the passes move
        _pool_before_relu(gm, modules)
        _skip_identity_pools(gm, modules)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _pool_before_relu(gm, modules: dict) -> None:
    """``ReLU → MaxPool2d`` becomes ``MaxPool2d → ReLU``: the same values and the same input gradient (ReLU is
    monotone, so it commutes with a max, ties included: where the max is 0 or below, both give 0 and gradient
    0), with the ReLU and its backward on a quarter of the elements (VGG-style nets, ``cnn-small``). Pools
    with padding are left alone (a window of padding alone gives -inf before the ReLU and 0 after it)."""
    from torch import fx
    for node in list(gm.graph.nodes):
        pool = modules.get(node.target) if node.op == "call_module" else None
        if (type(pool) is not nn.MaxPool2d or pool.return_indices or _pairs(pool.padding) != (0, 0)
                or len(node.args) != 1 or node.kwargs):
            continue  # padding: a window of padding alone is -inf before the ReLU, 0 after it
        relu = node.args[0]
        if (not isinstance(relu, fx.Node) or relu.op != "call_module" or type(modules.get(relu.target)) is not nn.ReLU
                or len(relu.users) != 1 or len(relu.args) != 1 or relu.kwargs or not isinstance(relu.args[0], fx.Node)):
            continue
        node.replace_all_uses_with(relu)
        node.args = (relu.args[0],)
        relu.args = (node,)
        node.append(relu)  # the ReLU now runs right after the pool


# modules whose output is a new tensor, never a view of their input or of a tensor kept elsewhere
_FRESH = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm2d)
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _pairs(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _in_place(node, modules: dict) -> bool:
    """Might this graph node write into a tensor it is given (an in-place module, method, function or
    operator)?"""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return (node.target in _IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_")
                or bool(node.kwargs.get("inplace", False)))
    return False


def _writes_only_fresh_tensors(gm, modules: dict) -> bool:
    """May the graph passes run? Only if every in-place write is an ``nn.ReLU`` rectifying the output of a
    convolution, linear layer, pool or batch norm that nothing else reads (``cnn-small``'s and VGG's
    pattern). Moving a ReLU after a pool makes it keep the pool's output for its backward, and skipping an
    identity pool hands on the layer before's output: an in-place write anywhere else (a ``Hardtanh`` after
    the pool, ``torch.relu_``, a ReLU behind a view or an ``Identity``) could then change a value or break
    the backward."""
    from torch import fx
    for node in gm.graph.nodes:
        if not _in_place(node, modules):
            continue
        src = node.args[0] if node.args else None
        if (node.op != "call_module" or type(modules.get(node.target)) is not nn.ReLU or len(node.args) != 1
                or not isinstance(src, fx.Node) or src.op != "call_module"
                or not isinstance(modules.get(src.target), _FRESH) or len(src.users) != 1):
            return False
    return True


class _SameSizeIdentity(nn.Module):
    """An ``AdaptiveAvgPool2d`` that returns its input when it is already of the output size (the average of one
    element is that element): cnn-small's pool is the identity at 28×28 and still rescales other sizes."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d, size: tuple):
        super().__init__()
        self.pool, self.size = pool, size

    def forward(self, x):
        return x if tuple(x.shape[-2:]) == self.size else self.pool(x)


def _skip_identity_pools(gm, modules: dict) -> None:
    """Each ``AdaptiveAvgPool2d`` of a fixed output size, wrapped in :class:`_SameSizeIdentity` (only in a graph
    whose in-place writes all land on fresh tensors: the identity hands on the layer before's own output)."""
    for node in gm.graph.nodes:
        pool = modules.get(node.target) if node.op == "call_module" else None
        if type(pool) is not nn.AdaptiveAvgPool2d:
            continue
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        if None in size:
            continue
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, _SameSizeIdentity(pool, tuple(size)))


def _fold_sequential(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``module`` with each ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an
    ``nn.Sequential`` folded into one convolution, and how many were folded. No tracing: a user's model is
    never run with proxies (its forward may have side effects); only its structure is read."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    module = copy.deepcopy(module)
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats \
                    and bn.running_mean is not None:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                folded += 1
    return module, folded


def attack_model(model: nn.Module, fast: FastPath, probe: Optional[torch.Tensor] = None) -> tuple[nn.Module, str]:
    """The model an attack should run: a folded channels_last copy of ``model`` when ``fast`` asks for it
    and it is safe, else ``model`` itself; and a note saying which (for reports).

    Folding needs every module in eval mode (an eval BN is an affine map; a train BN is not), no user
    hooks (they would be lost on the fused layers), a model ``torch.fx`` can trace, and logits on
    ``probe`` within float rounding of the original's. The copy is cached per model and rebuilt when
    any weight or buffer changes."""
    if not (fast.fold_bn or fast.channels_last):
        return model, "as given"
    if any(m.training for m in model.modules()):
        return model, "as given (train mode: batch norm is not an affine map)"
    if isinstance(model, torch.jit.ScriptModule):
        return model, "as given (TorchScript)"
    if _has_hooks(model):
        return model, "as given (the model has hooks)"
    sig = _signature(model)
    cached = _PREPARED.get(model)
    if cached is not None and cached[0] == sig and cached[1] == fast:
        prepared = cached[2] if cached[2] is not None else model
        # one small forward per call: weights changed behind autograd's back (p.data.mul_) make a new copy
        if prepared is model or _reproduces(model, prepared, fast, probe):
            return prepared, cached[3]
    prepared, note = _prepare(model, fast, probe)
    _PREPARED[model] = (sig, fast, None if prepared is model else prepared, note)  # never the key itself
    return prepared, note


def _reproduces(model: nn.Module, prepared: nn.Module, fast: FastPath, probe: Optional[torch.Tensor]) -> bool:
    """Do ``prepared``'s logits on ``probe`` match ``model``'s (within float rounding)?"""
    if probe is None:
        return True
    from .checks import logits_of
    # a randomised model draws from the global generators: whether this check runs (a copy is cached or not)
    # must not move what the attack then draws, or two evaluations after one torch.manual_seed would differ
    cuda = [probe.device] if probe.device.type == "cuda" else []
    with torch.no_grad(), fp32_island(probe.device), torch.random.fork_rng(devices=cuda):
        want = logits_of(model(probe)).float()
        try:  # a forward written for contiguous tensors (x.view(B, -1)) raises on channels_last ones
            got = logits_of(prepared(fast.inputs(probe))).float()
        except Exception:  # noqa: BLE001 (whatever the copy raises, the model as given is what runs)
            return False
    return bool(torch.isfinite(got).all()) and bool((got - want).abs().max() <= 1e-3 * want.abs().max().clamp_min(1.0))


def _prepare(model: nn.Module, fast: FastPath, probe: Optional[torch.Tensor]) -> tuple[nn.Module, str]:
    from .models.base import ImageClassifier
    folded = fast.fold_bn
    try:
        if isinstance(model, ImageClassifier):  # our own code: traced; features() and head stay as they are
            prepared = copy.deepcopy(model)
            if fast.fold_bn:
                prepared.body = _fold(prepared.body)
        elif fast.fold_bn:  # a user's model is never traced (its forward may have side effects)
            prepared, count = _fold_sequential(model)
            folded = count > 0
        else:
            prepared = copy.deepcopy(model)
    except Exception as e:  # a model that cannot be copied or traced is attacked as given
        return model, f"as given (could not be prepared for folding: {type(e).__name__})"
    for p in prepared.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    if fast.channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    prepared.eval()
    if fast.compile:  # the forward only: module names (and the head attacks look up) stay as they are
        if isinstance(prepared, ImageClassifier):
            prepared.body.forward = torch.compile(prepared.body.forward, dynamic=True)
        else:
            prepared.forward = torch.compile(prepared.forward, dynamic=True)
    if [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] != \
            [n for n, m in prepared.named_modules() if isinstance(m, nn.Linear)]:
        return model, "as given (its linear layers would not keep their names)"
    if probe is None and not isinstance(model, ImageClassifier):
        # nothing to try the copy on, and a user's forward may not take the copy's layout: the model as given
        return model, "as given (no input to check a copy on)"
    if not _reproduces(model, prepared, fast, probe):
        return model, "as given (the copy did not reproduce the logits, or its forward raised)"
    what = [w for w, on in (("batch norm folded", folded), ("channels_last", fast.channels_last),
                            ("compiled", fast.compile)) if on]
    _PRIVATE.add(prepared)
    return prepared, "private copy: " + ", ".join(what)


# ------------------------------------------------------------------ forward passes without gradient on a CPU

_PRIVATE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # the copies _prepare made (never a user's model)
# private copy -> its inference form (or the copy itself, when that could not be made)
_INFERENCE: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def inference_copy(prepared: nn.Module, probe: torch.Tensor) -> nn.Module:
    """The model to run for logits without gradient (Square's queries): on a CPU, the attack's private copy
    traced with ``torch.jit``, frozen and optimised for inference (oneDNN convolutions with pre-packed
    weights, convolution and ReLU fused): the same function up to float rounding, measured 1.16-1.28× faster than
    the copy on the PGD-AT cnn-small at batch 60 and 290 (benchmarks/bench_fast_forward.py).

    Anything else is returned as it is: a model that is not a private copy (a user's model is never traced:
    its forward may have side effects), a GPU (bf16 autocast is the lever there), autocast or a compiled copy,
    a copy that cannot be traced, or one whose traced form does not reproduce its logits on ``probe`` (traced
    on fewer rows than ``probe`` has, so a trace that fixed the batch size fails this check). Cached per copy.
    """
    if (probe.device.type != "cpu" or prepared not in _PRIVATE or torch.is_autocast_enabled("cpu")
            or probe.dim() != 4 or probe.shape[0] < 2):
        return prepared
    cached = _INFERENCE.get(prepared)
    if cached is None:
        cached = _frozen(prepared, probe)
        _INFERENCE[prepared] = cached
    return cached


def _frozen(prepared: nn.Module, probe: torch.Tensor) -> nn.Module:
    import warnings
    from .checks import logits_of
    rows = probe[:max(1, probe.shape[0] // 2)].contiguous(memory_format=torch.channels_last)

    class Logits(nn.Module):  # torch.jit.trace wants tensors out; the copy may return a ModelOutput
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return logits_of(self.m(x))

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the probe check below is what decides
            traced = torch.jit.trace(Logits(prepared).eval(), rows, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            want = logits_of(prepared(probe)).float()
            got = frozen(probe.contiguous(memory_format=torch.channels_last)).float()
    except Exception:  # noqa: BLE001 (a model the tracer cannot handle is run as the copy it is)
        return prepared
    ok = got.shape == want.shape and bool(torch.isfinite(got).all()) and \
        bool((got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1.0))
    return frozen if ok else prepared


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Parameters with ``requires_grad=False`` inside (input gradients only: no weight-gradient work or
    memory), each one's own flag restored after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def set_deterministic(on: bool) -> dict:
    """Deterministic GPU kernels (cuDNN and cuBLAS) for exactly repeatable runs; returns the previous settings
    for :func:`restore_deterministic`. Costs speed: cuDNN's autotuner is off and some kernels are slower."""
    import os
    prev = {"benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for determinism
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return prev


def restore_deterministic(prev: dict) -> None:
    import os
    torch.backends.cudnn.benchmark = prev["benchmark"]
    torch.backends.cudnn.deterministic = prev["cudnn_deterministic"]
    torch.use_deterministic_algorithms(prev["algorithms"])
    if prev["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev["cublas"]
