"""torchrun with 2 processes on the CPU (gloo): the evaluation equals the single-process one example by
example, and distributed training runs, checkpoints and resumes bit-exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights

import sirobust
from sirobust.data import load_dataset
from sirobust.statefile import read_state

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(*args: str, cwd: Path, procs: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m sirobust ARGS``, as a user types it (standalone rendezvous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "sirobust", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def at_weights(tmp_path_factory):
    """A cnn-small trained one epoch of PGD-2 AT: some examples robust, some not."""
    from helpers import small_config
    from sirobust.train import fit
    out = tmp_path_factory.mktemp("at")
    fit(small_config(out, epochs=1, train_n=768), log=lambda *_: None)
    return out / "model.safetensors"


def test_two_processes_evaluate_exactly_like_one(at_weights, tmp_path):
    common = ["--weights", str(at_weights), "-n", "96", "--batch-size", "16", "--attacks", "pgd,si-pgd,fgsm",
              "--steps", "4", "--no-progress"]
    done = torchrun("evaluate", *common, "--out", str(tmp_path / "two.json"), cwd=tmp_path)
    assert "2 processes" in done.stdout
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["provenance"]["processes"] == 2
    assert not (tmp_path / "two.evaluation").exists()  # rank 0 cleaned up; nobody else wrote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.json", "two.md"]

    model = sirobust.load(at_weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes ran one thread each
    try:
        one = sirobust.evaluate(model, load_dataset("fashion-mnist-mini", "test"), attacks=["pgd", "si-pgd", "fgsm"],
                                steps=4, n=96, batch_size=16, progress=False).to_dict()
    finally:
        torch.set_num_threads(threads)
    assert two["clean_correct"] == one["clean_correct"]
    for name in ("pgd", "si-pgd", "fgsm"):
        assert two["attacks"][name]["robust"] == one["attacks"][name]["robust"], name
    assert two["worst_case_robust"] == one["worst_case_robust"]
    assert 0 < sum(one["worst_case_robust"]) < sum(one["clean_correct"])  # the attacks broke some, not all


@pytest.mark.slow  # 45 s of four torchrun launches; the evaluation and reproduce tests stay in the default run
def test_two_processes_train_checkpoint_and_resume_bit_exactly_and_one_process_cannot_resume(tmp_path):
    common = ["--defense", "trades", "--with-si", "--train-n", "200", "--val-n", "16", "--steps", "1",
              "--batch-size", "64", "--milestones", "5", "--no-progress"]
    torchrun("train", *common, "--epochs", "2", "--out", str(tmp_path / "straight"), cwd=tmp_path)
    torchrun("train", *common, "--epochs", "1", "--out", str(tmp_path / "split"), cwd=tmp_path)
    # one process cannot continue what two started: their random streams and batch slices are the run's
    alone = subprocess.run([sys.executable, "-m", "sirobust", "train", *common, "--epochs", "2", "--out",
                            str(tmp_path / "split"), "--resume"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert alone.returncode == 2 and "2 process(es), this is 1" in alone.stderr, alone.stderr[-2000:]
    done = torchrun("train", *common, "--epochs", "2", "--out", str(tmp_path / "split"), "--resume", cwd=tmp_path)
    assert "resuming" in done.stdout
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "split" / "model.safetensors")
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["provenance"]["processes"] == 2
    state = read_state(tmp_path / "straight" / "train_state.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # each process drew its own random starts: their attack generators differ
    assert not torch.equal(state["ranks"][0]["rng"]["attack"], state["ranks"][1]["rng"]["attack"])


def test_reproduce_under_torchrun_writes_once_and_a_single_process_reuses_it(tmp_path):
    """Two processes train and evaluate a small table (rank 0 decides and writes); one process run
    afterwards finds every run and evaluation done, with the same numbers."""
    from test_reproduce import TINY
    from sirobust.reproduce import reproduce
    (tmp_path / "tiny.toml").write_text(TINY)
    done = torchrun("reproduce", str(tmp_path / "tiny.toml"), "--preset", "smoke", "--out", str(tmp_path / "out"),
                    "--no-progress", cwd=tmp_path)
    assert "(2 processes)" in done.stdout and done.stdout.count("written to") == 1  # rank 0 speaks
    two = json.loads((tmp_path / "out" / "tiny-smoke" / "table.json").read_text())
    assert two["counts"] == {"trained": 2, "reused_runs": 0, "evaluated": 2, "reused_evaluations": 0}
    assert len(list((tmp_path / "out" / "runs").rglob("eval-*.json"))) == 2
    again = reproduce(str(tmp_path / "tiny.toml"), preset="smoke", out=str(tmp_path / "out"), progress=False,
                      log=lambda *_: None)
    assert again["counts"] == {"trained": 0, "reused_runs": 2, "evaluated": 0, "reused_evaluations": 2}
    assert [r["values"] for r in again["rows"]] == [r["values"] for r in two["rows"]]


def test_leaving_the_group_frees_unreachable_objects_first(monkeypatch):
    """A DDP model left in a reference cycle holds gloo's work; freed only at interpreter exit, it sometimes
    aborted a process that had succeeded (SIGABRT, 1 run in 12 of the reproduce test above). ``shutdown``
    collects such garbage while the group and the interpreter are still alive, then destroys the group."""
    import gc
    import weakref
    import torch.distributed as dist
    from sirobust import distributed

    class Held:  # stands for the DDP wrapper: only a cycle keeps it, so only the collector frees it
        pass

    def orphan():
        obj = Held()
        obj.me = obj
        return weakref.ref(obj)

    alive_at_destroy = []
    gc.disable()  # no automatic collection in between: only an explicit one frees the cycle
    try:
        ref = orphan()
        assert ref() is not None
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "destroy_process_group", lambda: alive_at_destroy.append(ref() is not None))
        distributed.shutdown()
    finally:
        gc.enable()
    assert alive_at_destroy == [False]
