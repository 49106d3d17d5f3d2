"""The training loop: learning, exact resume, kill-and-resume, divergence, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sirobust
from sirobust.checkpoint import CheckpointError
from sirobust.defenses import DEFENSES
from sirobust.defenses.at import AT
from sirobust.io import read_jsonl
from sirobust.train import ResumeMismatch, TrainConfig, TrainingDiverged, fit

QUIET = dict(progress=False)


def small(out, **kw):
    base = dict(dataset="fashion-mnist-mini", model="cnn-small", defense="at", epochs=2, train_n=384,
                val_n=64, val_steps=2, attack_steps=2, batch_size=64, out=str(out), **QUIET)
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_folder_has_metrics_weights_and_config(tmp_path):
    fit(small(tmp_path), log=lambda *_: None)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["val_clean_acc"] <= 1 and 0 <= r["val_robust_acc"] <= 1 and r["val_n"] == 64
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["eps"] == 0.1 and cfg["defense"]["attack"]["model_mode"] == "eval"
    assert len(cfg["val_indices"]) == 600  # the recorded validation split (10% of 6000)
    model = sirobust.load(tmp_path)
    assert model.sirobust_metadata["dataset"] == "fashion-mnist-mini"
    best = json.loads((tmp_path / "summary.json").read_text())["best"]
    assert best["metric"] == "val_robust_acc"
    assert best["val_robust_acc"] == max(r["val_robust_acc"] for r in rows)
    first_best = next(r["epoch"] for r in rows if r["val_robust_acc"] == best["val_robust_acc"])
    assert best["epoch"] == first_best  # ties keep the earlier epoch
    assert sirobust.load(tmp_path / "best.safetensors").sirobust_metadata["extra"].count(f'"epoch": {first_best}')


@pytest.mark.parametrize("defense,si", [("at", False), ("trades", True), ("he", False)])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, defense, si):
    # lr ÷10 after epoch 2 of 3: the resume must carry the scheduler too
    kw = dict(milestones=(2,), defense=defense, si=si)
    fit(small(tmp_path / "straight", epochs=3, **kw), log=lambda *_: None)
    fit(small(tmp_path / "split", epochs=1, **kw), log=lambda *_: None)
    fit(small(tmp_path / "split", epochs=3, **kw), resume=True, log=lambda *_: None)
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "split" / "model.safetensors")
    assert [r["epoch"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_another_config_is_refused(tmp_path):
    fit(small(tmp_path, epochs=1, milestones=(5,)), log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="pass --milestones explicitly"):
        fit(small(tmp_path, epochs=20), resume=True, log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="differs in: .*lr"):
        fit(small(tmp_path, epochs=2, lr=0.2, milestones=(5,)), resume=True, log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="defense"):
        fit(small(tmp_path, epochs=2, defense="standard", milestones=(5,)), resume=True, log=lambda *_: None)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_without_checkpoint_and_a_malicious_state_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(small(tmp_path / "none"), resume=True, log=lambda *_: None)
    out = tmp_path / "evil"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (out / "train_state.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="not a readable"):
        fit(small(out), resume=True, log=lambda *_: None)
    assert not marker.exists()


def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    fit(small(tmp_path, epochs=1, milestones=()), log=lambda *_: None)
    good_state = (tmp_path / "train_state.pt").read_bytes()
    good_best = (tmp_path / "best.safetensors").read_bytes()
    calls = {"n": 0}
    original = AT.__call__

    def poisoned(self, model, x, y, generator=None):
        loss, stats = original(self, model, x, y, generator)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(AT, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 3"):
        fit(small(tmp_path, epochs=2, milestones=()), resume=True, log=lambda *_: None)
    assert (tmp_path / "train_state.pt").read_bytes() == good_state
    assert (tmp_path / "best.safetensors").read_bytes() == good_best
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="cifar11"), "valid datasets"), (dict(model="resnet19"), "valid models"),
    (dict(defense="fgsm-at2"), "valid defenses"), (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"),
    (dict(eps=-0.1), "eps"), (dict(batch_size=0), "batch_size"), (dict(device="tpu"), "device"),
])
def test_bad_config_is_a_clear_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        fit(small(tmp_path, **kw), log=lambda *_: None)


def test_kill_at_any_moment_then_resume_matches_a_straight_run(tmp_path):
    """SIGKILL a training subprocess mid-run, resume it, and compare with an uninterrupted run."""
    args = ["--dataset", "fashion-mnist-mini", "--model", "cnn-small", "--defense", "at", "--epochs", "3",
            "--train-n", "384", "--val-n", "64", "--attack-steps", "2", "--batch-size", "64", "--no-progress"]
    cmd = [sys.executable, "-m", "sirobust.cli", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "train_state.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # now somewhere inside epoch 2 (or writing it)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "train_state.pt").exists()
    assert len(read_jsonl(killed / "metrics.jsonl")) < 3  # really interrupted
    assert not (killed / "summary.json").exists()
    torch.load(killed / "train_state.pt", weights_only=True)  # never a torn file
    sirobust.load(killed)                                     # nor torn weights
    done = subprocess.run(cmd + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    straight = tmp_path / "straight"
    fit(small(straight, epochs=3), log=lambda *_: None)
    assert_same_weights(straight / "model.safetensors", killed / "model.safetensors")
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3]


def test_adversarial_training_is_far_more_robust_than_standard(tmp_path):
    kw = dict(epochs=2, train_n=2400, val_n=300, val_steps=10, attack_steps=5, batch_size=64)
    std = fit(small(tmp_path / "std", defense="standard", **kw), log=lambda *_: None)
    at = fit(small(tmp_path / "at", **kw), log=lambda *_: None)
    assert std["last"]["val_clean_acc"] > 0.7
    assert at["last"]["val_robust_acc"] > std["last"]["val_robust_acc"] + 0.25


def test_tensorboard_logging_when_asked(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'sirobust\[tensorboard\]'"):
            fit(small(tmp_path, epochs=1, tensorboard=True), log=lambda *_: None)
    else:
        fit(small(tmp_path, epochs=1, tensorboard=True), log=lambda *_: None)
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_compare_reuses_finished_runs_and_tabulates_every_defense(tmp_path):
    from sirobust.experiments.compare import compare_defenses
    logs = []
    kw = dict(epochs=1, out=str(tmp_path), eval_n=30, steps=2, progress=False,
              train_kw=dict(train_n=128, val_n=32, attack_steps=1))
    res = compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append, **kw)
    assert [r["label"] for r in res["rows"]] == ["STANDARD", "TRADES", "TRADES-SI"]
    for r in res["rows"]:
        assert r["worst_case"] <= min(r[a] for a in ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")) <= r["natural"]
    assert "| TRADES-SI |" in (tmp_path / "compare.md").read_text()
    logs.clear()
    compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append, **kw)
    assert sum("[reuse]" in str(m) for m in logs) == 3


def test_a_fresh_run_removes_the_previous_runs_results_before_training(tmp_path, monkeypatch):
    fit(small(tmp_path, epochs=1), log=lambda *_: None)
    assert (tmp_path / "summary.json").exists()
    import sirobust.train as tr

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(small(tmp_path, epochs=3), log=lambda *_: None)
    for stale in ("summary.json", "best.safetensors", "model.safetensors", "train_state.pt"):
        assert not (tmp_path / stale).exists(), stale


def test_fit_leaves_the_callers_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(small(tmp_path, epochs=1), log=lambda *_: None)
    assert torch.equal(torch.rand(3), expected)
