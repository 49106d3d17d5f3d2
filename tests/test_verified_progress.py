"""Saved evaluation progress is verified when read back (issue 21): a tampered, truncated, foreign, symlinked
or FIFO batch is refused by name, never trusted; a batch from before the checks is attacked again."""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import sirobust
from sirobust.progress import EvaluationProgress, ProgressError

N, BS = 48, 8


def run(model, data, folder, **kw):
    x, y = data
    return sirobust.evaluate(model, (x[:N], y[:N]), attacks=["pgd"], eps=0.1, steps=3, batch_size=BS,
                             progress=False, saved=EvaluationProgress(folder), **kw).to_dict()


@pytest.fixture
def saved_run(trained_cnn, fmnist_test, tmp_path):
    """A finished evaluation whose progress folder is kept: (its report, the folder)."""
    folder = tmp_path / "r.evaluation"
    return run(trained_cnn, fmnist_test, folder), folder


def first_batch(folder):
    return sorted((folder / "pgd").glob("batch-*.json"))[0]


def test_an_untouched_progress_gives_the_same_report(trained_cnn, fmnist_test, saved_run):
    report, folder = saved_run
    again = run(trained_cnn, fmnist_test, folder)
    assert again["attacks"]["pgd"]["robust"] == report["attacks"]["pgd"]["robust"]
    assert 0 < sum(report["attacks"]["pgd"]["robust"]) < sum(report["clean_correct"])  # some broken, some not


def test_a_tampered_batch_is_refused_by_name(trained_cnn, fmnist_test, saved_run):
    report, folder = saved_run
    path = first_batch(folder)
    saved = json.loads(path.read_text())
    assert not all(saved["result"]["robust"])      # the attack broke something in this batch
    saved["result"]["robust"] = [True] * len(saved["result"]["robust"])
    path.write_text(json.dumps(saved))
    with pytest.raises(ProgressError) as e:
        run(trained_cnn, fmnist_test, folder)
    msg = str(e.value)
    assert str(path) in msg and "checksum" in msg and "delete that file" in msg and "--overwrite" in msg


@pytest.mark.parametrize("damage", ["truncated", "not json", "missing field"])
def test_a_damaged_batch_is_refused_by_name(trained_cnn, fmnist_test, saved_run, damage):
    _, folder = saved_run
    path = first_batch(folder)
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[:len(text) // 2])
    elif damage == "not json":
        path.write_bytes(b"\xff\xfe garbage")
    else:
        saved = json.loads(text)
        del saved["result"]["max_delta"]
        path.write_text(json.dumps(saved))
    with pytest.raises(ProgressError, match=str(path).replace(".", r"\.")):
        run(trained_cnn, fmnist_test, folder)


def test_a_batch_of_another_evaluation_is_refused(trained_cnn, fmnist_test, saved_run):
    _, folder = saved_run
    x, y = fmnist_test
    with pytest.raises(ProgressError, match="another evaluation"):
        sirobust.evaluate(trained_cnn, (x[:N], y[:N]), attacks=["pgd"], eps=0.05, steps=3, batch_size=BS,
                          progress=False, saved=EvaluationProgress(folder))


def test_a_symlinked_batch_is_refused_without_being_followed(trained_cnn, fmnist_test, saved_run, tmp_path):
    _, folder = saved_run
    path = first_batch(folder)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(path.read_text())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(ProgressError, match="symbolic link"):
        run(trained_cnn, fmnist_test, folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_batch_is_refused_without_being_opened(trained_cnn, fmnist_test, saved_run):
    _, folder = saved_run
    path = first_batch(folder)
    path.unlink()
    os.mkfifo(path)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        error=pytest.raises(ProgressError, run, trained_cnn, fmnist_test, folder)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    if worker.is_alive():  # open() would block on a FIFO with no writer: unblock it, then fail
        with open(path, "w"):
            pass
        pytest.fail("the FIFO was opened")
    assert "not a regular file" in str(result["error"].value)


def test_a_batch_from_before_the_checks_is_attacked_again_not_trusted(trained_cnn, fmnist_test, saved_run,
                                                                       monkeypatch):
    report, folder = saved_run
    path = first_batch(folder)
    legacy = json.loads(path.read_text())["result"]
    legacy["robust"] = [True] * len(legacy["robust"])        # unverifiable, and wrong
    path.write_text(json.dumps(legacy))
    ev = importlib.import_module("sirobust.evaluate")  # the module; sirobust.evaluate is also the function
    attacked = []
    real = ev._run_batch
    monkeypatch.setattr(ev, "_run_batch", lambda *a, **k: attacked.append(1) or real(*a, **k))
    again = run(trained_cnn, fmnist_test, folder)
    assert len(attacked) == 1                                # that batch alone, again
    assert again["attacks"]["pgd"]["robust"] == report["attacks"]["pgd"]["robust"]
    assert "sha256" in json.loads(path.read_text())         # and it is saved verified now


def test_cli_resume_refuses_a_tampered_batch_in_one_line(trained_cnn, tmp_path):
    weights = tmp_path / "m.safetensors"
    sirobust.save_model(trained_cnn, weights, model_name="cnn-small", dataset="fashion-mnist-mini")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "sirobust", "evaluate", "--weights", str(weights), "-n", "2000", "--batch-size", "8",
           "--attacks", "pgd", "--steps", "20", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    batches = tmp_path / "r.evaluation" / "pgd"
    # SIGINT as a terminal gives it (a background job, as CI may be, inherits it ignored)
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list(batches.glob("batch-*.json")) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)   # a graceful stop: the finished batches stay
    child.communicate(timeout=120)
    assert child.returncode == 130 and not out.exists()
    path = sorted(batches.glob("batch-*.json"))[0]
    saved = json.loads(path.read_text())
    saved["result"]["robust"] = [True] * len(saved["result"]["robust"])
    path.write_text(json.dumps(saved))
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--overwrite" in lines[0], done.stderr


KILL_MID_SAVE = """
import os, sys
from pathlib import Path
from sirobust import report
from sirobust.io import atomic_write_text
def save(self, path, markdown=True):   # dies like a SIGKILL between the report's two files
    path = Path(path)
    if sys.argv[1] == "after the json":   # the order of an older sirobust
        atomic_write_text(path, self.to_json())
    else:
        atomic_write_text(path.with_suffix(".md"), self.to_markdown())
    os._exit(9)
report.Report.save = save
from sirobust.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def straight_evaluation(trained_cnn, tmp_path_factory):
    """The weights, the evaluate arguments (without --out) and the report of a run that was never stopped."""
    folder = tmp_path_factory.mktemp("straight")
    weights = folder / "m.safetensors"
    sirobust.save_model(trained_cnn, weights, model_name="cnn-small", dataset="fashion-mnist-mini")
    args = ["evaluate", "--weights", str(weights), "-n", "32", "--batch-size", "8", "--attacks", "pgd", "--steps",
            "2", "--no-progress", "--out"]
    straight = folder / "straight.json"
    done = subprocess.run([sys.executable, "-m", "sirobust", *args, str(straight)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return args, straight


@pytest.mark.parametrize("killed", ["after the json", "after the md"])
def test_a_save_killed_halfway_is_completed_by_resume(straight_evaluation, tmp_path, killed):
    """A SIGKILL between the report's two files left a JSON, no .md and the progress folder, and --resume
    refused ("finished"); now the .md is written first, and either leftover is completed (issue 21)."""
    out = tmp_path / "r.json"
    args, straight = straight_evaluation
    args = [*args, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_run = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, killed, *args], env=env, capture_output=True,
                                text=True, timeout=300)
    assert killed_run.returncode == 9 and (tmp_path / "r.evaluation").is_dir()
    assert out.exists() == (killed == "after the json") and out.with_suffix(".md").exists() != out.exists()
    again = subprocess.run([sys.executable, "-m", "sirobust", *args, "--resume"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(out.read_text())["worst_case_robust"] == json.loads(straight.read_text())["worst_case_robust"]
    assert out.with_suffix(".md").read_text().splitlines()[:6] == straight.with_suffix(".md").read_text().splitlines()[:6]
    assert not (tmp_path / "r.evaluation").exists()
