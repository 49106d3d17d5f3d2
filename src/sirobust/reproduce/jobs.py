"""``--jobs N``: N shards of one grid at once on this machine, each a process of its own.

Job K runs ``reproduce(..., shard=(K, N), steal=True)`` (see :func:`.plan.shard_runs`) in a child process: its
shard's runs and evaluations first, then any of the grid's that no other job has started (a split made
before the grid starts cannot know which runs earlier tables already trained, so a static one left a job
idle while another still had a queue of runs). A run another job is training is waited for, so that its
cells' evaluations are shared too. Each job is placed:

* on a machine with GPUs (device ``auto`` or ``cuda``), pinned to one of them through
  ``CUDA_VISIBLE_DEVICES`` (job K gets the K-th visible GPU, round robin when N exceeds them);
* on a CPU, given ``cores // N`` threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``), so that the
  jobs share the cores instead of fighting over them.

Each child's lines are printed prefixed ``[job K/N]``; progress bars are off. The children claim every
run and evaluation by its lock (:class:`.runner.UnitLock`), as shards of a SLURM array do, so nothing is
computed twice even beside another ``sirobust reproduce`` on the same folder. Once every child has
ended, the parent writes the table from the folder (``collect``). A stopped grid resumes with the same
command; SIGINT or SIGTERM to the parent is passed on to the children, which save their progress.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional

THREADS_ENV = "SIROBUST_NUM_THREADS"


class JobsFailed(RuntimeError):
    """A job of ``--jobs`` ended with an error; the others finished their parts (kept in ``OUT``)."""


def job_environment(k: int, jobs: int, device: str) -> dict:
    """The environment of job ``k`` (1-based) of ``jobs``: its GPU, or its share of the CPU threads."""
    env = dict(os.environ)
    gpus = _visible_gpus() if device in ("auto", "cuda") or device.startswith("cuda") else []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[(k - 1) % len(gpus)]
    else:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update({THREADS_ENV: threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    return env


def _visible_gpus() -> list[str]:
    import torch
    if not torch.cuda.is_available():
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [g.strip() for g in given.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_jobs(name: str, preset: str, out: str, overrides: Optional[dict], device: str, jobs: int,
             overwrite: bool = False, model_dir: Optional[str] = None, accept_unpinned: bool = False,
             log: Callable = print, ledger: Optional[str] = None, ledger_read: bool = True) -> None:
    """Run the ``jobs`` shards of the grid as child processes and wait for all of them; raises
    :class:`JobsFailed` naming the jobs that failed (after the others have finished their parts)."""
    from .runner import open_root
    if overwrite:  # once, before any child: the folder is moved aside while nobody uses it
        with open_root(out, overwrite=True, log=log):
            pass
    children = []
    for k in range(1, jobs + 1):
        spec = {"name": name, "preset": preset, "out": str(out), "overrides": overrides or {}, "device": device,
                "shard": [k, jobs], "model_dir": model_dir, "accept_unpinned": accept_unpinned, "steal": True,
                "ledger": None if ledger is None else str(ledger), "ledger_read": ledger_read}
        env = job_environment(k, jobs, device)
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env and THREADS_ENV not in env \
            else f"{env.get(THREADS_ENV)} CPU thread(s)"
        log(f"[job {k}/{jobs}] started on {where}")
        # a session of its own: a Ctrl-C reaches the parent alone, which stops each job once (SIGTERM), so that
        # every job saves its progress instead of being hit twice
        proc = subprocess.Popen([sys.executable, "-m", "sirobust.reproduce.jobs", json.dumps(spec)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc, f"[job {k}/{jobs}] ", log), daemon=True)
        pump.start()
        children.append((k, proc, pump))
    try:
        for _k, proc, pump in children:
            proc.wait()
            pump.join()
    except BaseException:  # Ctrl-C or SIGTERM: each child saves its progress and stops
        try:
            _stop_children([proc for _k, proc, _thread in children])
        finally:
            for _k, _proc, pump in children:  # the jobs' last lines ("stopped: ...") are printed before the parent's
                pump.join(timeout=5)
        raise
    failed = [(k, proc.returncode) for k, proc, _ in children if proc.returncode != 0]
    if failed:
        raise JobsFailed("; ".join(f"job {k}/{jobs} exited with status {rc}" for k, rc in failed)
                           + " (its lines above, prefixed [job K/N], say why); what the others finished is kept: "
                             "run the same command again to continue")


def _stop_children(procs: list, grace_seconds: float = 60.0) -> None:
    """Ask each running job to stop after its current step (SIGTERM) and wait for them. A second Ctrl-C or
    SIGTERM while waiting passes a second signal on, which stops the jobs at once (every file they wrote is
    complete); a job still running ``grace_seconds`` after that is killed. The parent never leaves a job running
    behind it: the job would hold its locks and write into a closed pipe."""
    def signal_running():
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    signal_running()
    try:
        for proc in procs:
            proc.wait()
    except KeyboardInterrupt:
        signal_running()
        for proc in procs:
            try:
                proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _pump(proc, prefix: str, log: Callable) -> None:
    for line in proc.stdout:
        log(prefix + line.rstrip("\n"))


def main(argv: list[str]) -> int:
    """A job's process: one shard of the grid (the spec is JSON, written by :func:`run_jobs`)."""
    spec = json.loads(argv[0])
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    from ..interrupts import RunInterrupted, terminate_as_interrupt
    from . import reproduce
    terminate_as_interrupt()  # a SIGTERM between saved points still runs every cleanup (locks, temporary files)
    try:
        reproduce(spec["name"], preset=spec["preset"], out=spec["out"], overrides=spec["overrides"],
                  device=spec["device"], progress=False, model_dir=spec["model_dir"],
                  accept_unpinned=spec["accept_unpinned"], shard=tuple(spec["shard"]), log=_flush_print,
                  steal=bool(spec.get("steal")), ledger=spec.get("ledger"),
                  ledger_read=spec.get("ledger_read", True))
    except RunInterrupted as e:
        print(f"stopped: {e}", flush=True)
        return 128 + int(getattr(e, "signum", signal.SIGTERM) or signal.SIGTERM)
    except KeyboardInterrupt as e:  # a second signal, or one outside a saved point: every file is complete
        print("stopped: interrupted; every file written so far is complete. Continue with the same command",
              flush=True)
        return getattr(e, "exit_code", 128 + int(signal.SIGINT))
    return 0


def _flush_print(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
