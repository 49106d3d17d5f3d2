"""Several processes, one run: torchrun's environment and torch.distributed, nothing home-made.

``torchrun --nproc-per-node N -m sirobust train|evaluate ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set (and ``MASTER_ADDR``/``MASTER_PORT`` for the
rendezvous). :func:`current` reads them, joins the process group (NCCL on GPUs, gloo on CPUs) and
says which part of the work is this process's:

- evaluation: whole batches of the single-process run, dealt round-robin, so that every batch is
  computed exactly as one process would compute it (random starts are keyed per example), and the
  per-example results of 1 and N processes are the same;
- training: DistributedDataParallel; each process takes its slice of every global batch
  (``--batch-size`` is the global batch) and gradients are averaged by DDP's all-reduce.

Rank 0 alone writes files (reports, checkpoints, metrics); the others compute. A failure on rank 0
before the work starts (an output refused, say) is sent to the others, which raise it too instead of
waiting forever.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .device import pick_device

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place in the run. ``world == 1``: a single process (nothing distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (no-ops alone)
    def gather(self, obj: Any) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (a stop signal seen by one of them): one small
        all-reduce, on the GPU with NCCL."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every process, as DDP does before each forward."""
        if self.enabled:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def local_first(self, fn, *args, **kw):
        """``fn`` on each node's first process, then on the others: a download or extraction happens once
        per node, and the others find the files ready."""
        if self.enabled and self.local_rank != 0:
            dist.barrier()
        result = fn(*args, **kw)
        if self.enabled and self.local_rank == 0:
            dist.barrier()
        return result

    def sum(self, values: dict) -> dict:
        """Each number of ``values`` summed over the processes (same keys on every process)."""
        if not self.enabled:
            return dict(values)
        total: dict = {}
        for part in self.gather(dict(values)):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def first(self, fn, *args, share: bool = True, **kw):
        """Run ``fn`` on rank 0 and hand its result to every process (``share=False``: the others get None,
        for results that cannot be sent); an exception on rank 0 is raised on every process (as the same
        type when it can be rebuilt from its message), so none waits forever."""
        result, error = None, None
        if self.main:
            try:
                result = fn(*args, **kw)
            except BaseException as e:  # noqa: B036 (re-raised below, on every rank)
                error = e
        if not self.enabled:
            if error is not None:
                raise error
            return result
        sent = self.broadcast(None if error is None else (type(error), str(error)))
        if sent is not None:
            if error is not None:
                raise error
            kind, message = sent
            try:
                raise kind(message)
            except TypeError:
                raise RuntimeError(f"rank 0 failed: {kind.__name__}: {message}") from None
        return self.broadcast(result) if share else result

    def device(self, name: str) -> torch.device:
        """The device of this process: ``cuda:LOCAL_RANK`` on GPUs (one GPU per process), else ``name``."""
        dev = pick_device(name)
        if self.enabled and dev.type == "cuda":
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev


def launched() -> bool:
    """Was this process started by torchrun (or another launcher that sets WORLD_SIZE > 1)?"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


_GROUP: Optional[Group] = None


def current(device: str = "auto") -> Group:
    """This process's :class:`Group`, joining the process group on first use when torchrun started us."""
    global _GROUP
    if dist.is_available() and dist.is_initialized():
        if _GROUP is None or _GROUP.world != dist.get_world_size():
            _GROUP = Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return _GROUP
    if not launched():
        return Group()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise RuntimeError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are missing or not integers: start distributed runs "
                           "with torchrun (torchrun --nproc-per-node N -m sirobust ...)") from None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run with one process")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _GROUP = Group(rank, world, local)
    return _GROUP


def shutdown() -> None:
    """Leave the process group (at the end of a command).

    Garbage is collected first: a DistributedDataParallel model that training left behind in a reference cycle
    still holds gloo's pending work, and freed only at interpreter exit it sometimes aborted the process
    ("terminate called without an active exception", SIGABRT) after the command had succeeded: in 1 of 12
    runs of tests/test_distributed.py's torchrun reproduce test on this machine, and in 4 of 50 runs of a
    two-process DDP script that trained in a function and exited; with the collection first, 0 of 60."""
    global _GROUP
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _GROUP = None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (attacks run on it: their input-only gradients
    must not start DDP's gradient reduction), or ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model
