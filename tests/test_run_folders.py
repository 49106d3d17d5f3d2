"""Nothing lost: run folders owned by one run, locks, resume from any kill, outputs checked first."""
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, small_config, tensors

from sirobust.cli import main
from sirobust.interrupts import RunInterrupted
from sirobust.io import OutputError, atomic_write_text, check_output_dir, check_output_file
from sirobust.runfolder import LOCK_NAME, FolderBusy, FolderLock, RunFolder, RunFolderError, fresh_name
from sirobust.statefile import StateFileError, prev_path
from sirobust.train import fit

ARGS = ["--dataset", "fashion-mnist-mini", "--model", "cnn-small", "--defense", "at", "--epochs", "3",
        "--train-n", "384", "--val-n", "64", "--val-steps", "2", "--attack-steps", "2", "--batch-size", "64",
        "--no-progress"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
QUIET = dict(log=lambda *_: None)


def small(out, **kw):
    return small_config(out, **{"epochs": 3, **kw})


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sirobust.cli", *args], capture_output=True, text=True, env=ENV, **kw)


def start(*args, prelude: str = ""):
    """A `sirobust` process; ``prelude`` is test instrumentation run before the CLI (a patch)."""
    code = f"{prelude}\nimport sys\nfrom sirobust.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(proc, predicate, timeout=120.0, lines=None):
    """Read the process's output line by line until ``predicate(line)``; returns that line."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if lines is not None:
            lines.append(line)
        if predicate(line):
            return line
        if time.time() > deadline:
            break
    raise AssertionError(f"never saw the expected line; output: {''.join(lines or [])[-2000:]}")


def leftovers(folder: Path) -> list[str]:
    """Debris of killed writes, and a lock still held or not released cleanly (a released lock is empty)."""
    out = sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".part")))
    lock = folder / LOCK_NAME
    if lock.exists() and (lock.read_bytes() or not _unlocked(lock)):
        out.append(LOCK_NAME)
    return out


def _unlocked(path: Path) -> bool:
    import fcntl
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(small(out), **QUIET)
    return out


# ----------------------------------------------------------------------------------- ownership

def test_cli_train_into_a_used_folder_exits_before_training_and_keeps_the_run(tmp_path, straight):
    run = tmp_path / "run"
    fit(small(run, epochs=1), **QUIET)
    before = tensors(run / "model.safetensors")
    r = cli("train", *ARGS, "--out", str(run))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "already holds a train run" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr and "epoch" not in r.stdout
    after = tensors(run / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    fit(small(run, epochs=1), **QUIET)
    old = tensors(run / "model.safetensors")
    assert main(["train", *ARGS, "--epochs", "1", "--seed", "3", "--out", str(run), "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1
    kept = tensors(aside[0] / "model.safetensors")
    assert all(torch.equal(old[k], kept[k]) for k in old)
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 3


def test_a_folder_that_holds_other_files_is_never_used_nor_moved(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(RunFolderError, match="holds no sirobust run.*thesis.tex"):
            RunFolder(tmp_path, "train", mode, log=lambda *_: None).claim()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_NAME) == ["thesis.tex"]


def test_someone_elses_model_folder_is_not_taken_for_an_old_run(tmp_path):
    """A folder with config.json and model.safetensors (a Hugging Face model, say) is no sirobust run:
    --resume and --overwrite must leave it exactly as it is."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["ViT"]}')
    (hf / "model.safetensors").write_bytes(os.urandom(4096))
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(RunFolderError, match="holds no sirobust run"):
            fit(small(hf, epochs=1), **kw, **QUIET)
    assert {p.name: p.read_bytes() for p in hf.iterdir() if p.name != LOCK_NAME} == before
    assert not any(p.name.startswith("hf.old-") for p in tmp_path.iterdir())


def test_resume_of_a_mistyped_folder_creates_nothing_and_a_failed_overwrite_puts_the_old_run_back(tmp_path,
                                                                                                  monkeypatch):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        fit(small(tmp_path / "typo", epochs=1), resume=True, **QUIET)
    assert not (tmp_path / "typo").exists()
    run = tmp_path / "run"
    fit(small(run, epochs=1), **QUIET)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_NAME}
    import sirobust.train as tr

    def missing(*a, **k):
        raise FileNotFoundError("the dataset vanished")

    monkeypatch.setattr(tr, "load_dataset", missing)
    with pytest.raises(FileNotFoundError, match="vanished"):  # fails after the old run was moved aside
        fit(small(run, epochs=1), overwrite=True, **QUIET)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_NAME} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_modes_and_kinds(tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        RunFolder(tmp_path / "a", "train", "resume").claim()
    with RunFolder(tmp_path / "a", "compare", "new", config={"x": 1}) as f:
        assert not f.resumed and (f.path / "run.json").exists()
        (f.path / "compare.md").write_text("a result")
    with pytest.raises(RunFolderError, match="holds a compare run, not a train run"):
        RunFolder(tmp_path / "a", "train", "overwrite").claim()
    with RunFolder(tmp_path / "a", "compare", "resume") as f:
        assert f.resumed and f.record["config"] == {"x": 1}
    assert leftovers(tmp_path / "a") == []


def test_default_outputs_take_a_fresh_name(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").mkdir()
    (tmp_path / "report.json").write_text("{}")
    assert fresh_name(tmp_path / "runs" / "demo") == tmp_path / "runs" / "demo-2"
    assert fresh_name(tmp_path / "report.json") == tmp_path / "report-2.json"
    assert fresh_name(tmp_path / "free") == tmp_path / "free"


def test_claim_removes_the_debris_of_killed_writes(tmp_path):
    with RunFolder(tmp_path, "train", "new"):
        pass
    (tmp_path / ".model.safetensors.1234abcd.tmp").write_bytes(b"half")
    (tmp_path / ".train_state.pt.new.tmp").write_bytes(b"half")
    with RunFolder(tmp_path, "train", "resume"):
        assert leftovers(tmp_path) == [LOCK_NAME]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------- locks

@pytest.mark.slow  # 18 s of subprocesses; the lock's holder, message and takeover are tested in-process below
def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    run = tmp_path / "run"
    first = start("train", *ARGS, "--epochs", "4", "--train-n", "1024", "--out", str(run))
    lines = []
    wait_for(first, lambda line: "epoch 1/4" in line, lines=lines)
    holder = json.loads((run / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = cli("train", *ARGS, "--out", str(run), "--resume", timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"in use by process {first.pid} on {socket.gethostname()}" in second.stderr
    lines += first.stdout.readlines()
    assert first.wait(timeout=120) == 0, "".join(lines)
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert leftovers(run) == []


@pytest.mark.parametrize("host", ["this", "another-machine"])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, host):
    """A lock file left by a killed process (here: a dead pid, on this host or another one sharing the
    folder) holds no flock: the next run takes it over and says whose it was."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname() if host == "this" else host
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": host, "started": "2026-01-01T00:00:00Z",
                                                  "command": "sirobust train"}))
    logs = []
    with RunFolder(tmp_path, "train", "new", log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"process {dead.pid} on {host}" in m and "ended without releasing it" in m for m in logs)
    assert leftovers(tmp_path) == []


def test_a_held_lock_is_refused_by_name(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire()
    with pytest.raises(FolderBusy, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
        FolderLock(tmp_path).acquire()
    lock.release()
    FolderLock(tmp_path).acquire()


RACE = r"""
import json, os, sys, time
from pathlib import Path
from sirobust.runfolder import FolderBusy, FolderLock
folder, log = Path(sys.argv[1]), Path(sys.argv[2])
while time.time() < float(sys.argv[3]):
    pass
lock = FolderLock(folder)
try:
    lock.acquire(log=lambda m: None)
except FolderBusy:
    sys.exit(0)
t0 = time.time(); time.sleep(0.3); t1 = time.time()
with open(log, "a") as f:
    f.write(json.dumps([t0, t1]) + "\n")
lock.release()
"""


@pytest.mark.slow  # 14 s of six processes; the takeover of a stale lock by one process is in the default run
def test_contenders_for_a_stale_lock_never_share_the_folder(tmp_path):
    """Six processes start together on a folder whose lock a killed run left behind; whoever gets in
    holds it alone (the intervals in which winners held it never overlap), and at least one gets in."""
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "x"}))
    log = tmp_path / "held.jsonl"
    go = time.time() + 8  # all processes spin until this moment (their imports take a few seconds)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "f"), str(log), str(go)]) for _ in range(6)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    spans = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert spans
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, spans


# ----------------------------------------------------------------------------------- resume from any kill

@pytest.mark.slow  # 30 s of killed subprocesses; in-process stops and resumes are in the default run
def test_kills_at_every_kind_of_moment_then_resume_match_a_straight_run(tmp_path, straight):
    """SIGKILL before the first checkpoint, SIGTERM inside an epoch, SIGKILL inside a checkpoint write,
    SIGINT inside an epoch: after `--resume` (with only --out), the weights equal the straight run's."""
    run = tmp_path / "run"
    # 1. SIGKILL as soon as the folder is claimed: no checkpoint exists yet
    p = start("train", *ARGS, "--out", str(run))
    deadline = time.time() + 60
    while not (run / "run.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "train_state.pt").exists()
    # 2. resume (only --out: the recorded config is used), then SIGTERM inside epoch 2
    lines = []
    p = start("train", "--out", str(run), "--resume", "--no-progress")
    wait_for(p, lambda line: "starting over with its recorded config" in line, lines=lines)
    wait_for(p, lambda line: line.startswith("epoch 1/3"), lines=lines)
    p.send_signal(signal.SIGTERM)
    lines += p.stdout.readlines()
    assert p.wait() == 128 + signal.SIGTERM
    said = "".join(lines)
    assert "stopped by SIGTERM" in said and f"sirobust train --out {run} --resume" in said
    # 3. SIGKILL while the next checkpoint is being written (instrumented to pause inside the write)
    pause = ("import sirobust.statefile as sf, time\n"
             "real = sf.atomic_write\n"
             "def paused(path, write):\n"
             "    def w(f):\n"
             "        write(f); f.flush(); print('WRITING', flush=True); time.sleep(60)\n"
             "    return real(path, w)\n"
             "sf.atomic_write = paused")
    p = start("train", "--out", str(run), "--resume", prelude=pause)
    wait_for(p, lambda line: line.startswith("WRITING"))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert any(n.endswith(".tmp") for n in os.listdir(run))  # the torn write's temporary file
    torch.load(run / "train_state.pt", weights_only=True)     # the checkpoint itself is whole
    # 4. SIGINT inside an epoch
    lines = []
    p = start("train", "--out", str(run), "--resume", "--no-progress")
    wait_for(p, lambda line: line.startswith("resuming"), lines=lines)
    p.send_signal(signal.SIGINT)
    lines += p.stdout.readlines()
    assert p.wait() in (0, 128 + signal.SIGINT), "".join(lines)  # 0 only if the run ended first
    # 5. to the end
    done = cli("train", "--out", str(run), "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_weights(straight / "model.safetensors", run / "model.safetensors")
    assert_same_weights(straight / "best.safetensors", run / "best.safetensors")
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert leftovers(run) == []


def test_a_stop_signal_inside_an_epoch_saves_the_batches_done(tmp_path, straight, monkeypatch):
    """In-process: the first stop request saves mid-epoch; resuming continues at the next batch."""
    import sirobust.interrupts as itr
    import sirobust.train as tr
    real = tr._train_epoch
    calls = {"n": 0}

    def stop_in_epoch_two(model, defense, opt, loader, gen, epoch, cfg, partial, stop, *rest):
        if epoch == 1 and partial is None:
            calls["n"] += 1
            stop.signum = signal.SIGTERM  # as the handler would on `kill`
        return real(model, defense, opt, loader, gen, epoch, cfg, partial, stop, *rest)

    monkeypatch.setattr(tr, "_train_epoch", stop_in_epoch_two)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted, match=r"in epoch 2, after batch 1/6") as e:
        fit(small(run), **QUIET)
    assert e.value.exit_code == 143 and calls["n"] == 1
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["loader"]["position"] == 1
    monkeypatch.setattr(tr, "_train_epoch", real)
    logs = []
    fit(small(run), resume=True, log=logs.append)
    assert any("resuming" in m and "epoch 2/3, batch 2" in m for m in logs)
    assert_same_weights(straight / "model.safetensors", run / "model.safetensors")
    assert itr  # the module under test


# ----------------------------------------------------------------------------------- damaged state

def test_a_damaged_state_falls_back_to_the_previous_checkpoint(tmp_path, straight):
    run = tmp_path / "run"
    fit(small(run, epochs=2, milestones=(2,)), **QUIET)
    assert prev_path(run / "train_state.pt").exists()
    data = bytearray((run / "train_state.pt").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    (run / "train_state.pt").write_bytes(bytes(data))
    logs = []
    fit(small(run, epochs=3, milestones=(2,)), resume=True, log=logs.append)
    warning = next(m for m in logs if m.startswith("warning"))
    assert "train_state.pt" in warning and "using the previous checkpoint train_state.prev.pt" in warning
    assert any("resuming" in m and "epoch 2/3" in m for m in logs)
    reference = tmp_path / "reference"
    fit(small(reference, epochs=3, milestones=(2,)), **QUIET)
    assert_same_weights(reference / "model.safetensors", run / "model.safetensors")


def test_a_damaged_state_without_a_previous_one_is_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    fit(small(run, epochs=1), **QUIET)
    (run / "train_state.pt").write_bytes(b"PK\x03\x04 not really")
    r = cli("train", "--out", str(run), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{run / 'train_state.pt'}" in r.stderr and "Traceback" not in r.stderr


def test_a_state_from_another_run_is_refused_by_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(small(a, epochs=1), **QUIET)
    fit(small(b, epochs=1), **QUIET)
    (b / "train_state.pt").write_bytes((a / "train_state.pt").read_bytes())
    prev_path(b / "train_state.pt").unlink(missing_ok=True)
    with pytest.raises(StateFileError, match=r"train_state.pt belongs to another run"):
        fit(small(b, epochs=2), resume=True, **QUIET)


# ----------------------------------------------------------------------------------- outputs checked first

def _no_work(monkeypatch):
    """Make loading data or a model an immediate test failure, wherever a module bound them."""
    import sirobust.checkpoint as ck
    for name in ("sirobust.demo", "sirobust.reproduce.compare", "sirobust.experiments.rescale",
                 "sirobust.reproduce.runner"):
        importlib.import_module(name)  # imported now, so that their bindings are patched below
    from sirobust.data import registry

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")
    originals = (registry.load_dataset, ck.load)
    for mod in [m for name, m in sys.modules.items() if name.startswith("sirobust") and m is not None]:
        for attr, value in list(vars(mod).items()):
            if any(value is f for f in originals):
                monkeypatch.setattr(mod, attr, boom)


def read_only_folder(tmp_path) -> Path:
    """A folder nobody can write into: /proc for root (permissions do not stop root), else chmod 0o555."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.parametrize("command", ["train", "evaluate", "rescale", "compare", "demo", "reproduce"])
def test_unwritable_outputs_fail_before_any_work_in_one_line(tmp_path, monkeypatch, capsys, command):
    _no_work(monkeypatch)
    (tmp_path / "file").write_text("x")
    ro = read_only_folder(tmp_path)
    model = ["--weights", str(tmp_path / "w.safetensors")]
    for out in (tmp_path / "file" / "sub", ro / "sub", ro):
        target = str(out / "report.json") if command == "evaluate" and out != ro else str(out)
        args = {"train": ["train", *ARGS], "evaluate": ["evaluate", *model], "rescale": ["rescale", *model],
                "compare": ["compare"], "demo": ["demo"], "reproduce": ["reproduce", "table6", "--preset", "smoke"],
                }[command] + ["--out", target]
        assert main(args) == 2, (command, out)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"sirobust {command}: error: cannot"), err
        assert str(out if out != ro else ro) in err


def test_report_names_are_never_reused_silently(tmp_path, trained_cnn, monkeypatch):
    from sirobust.checkpoint import save_model
    weights = save_model(trained_cnn, tmp_path / "w.safetensors", model_name="cnn-small", dataset="fashion-mnist-mini")
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--weights", str(weights), "--attacks", "fgsm", "-n", "8", "--no-progress"]
    assert main(args) == 0 and main(args) == 0  # no --out: report.json, then report-2.json
    assert (tmp_path / "report.json").exists() and (tmp_path / "report-2.json").exists()
    first = (tmp_path / "report.json").read_text()
    assert main(args + ["--out", "report.json"]) == 2  # named and taken: refused
    assert (tmp_path / "report.json").read_text() == first
    assert main(args + ["--out", "report.json", "--overwrite"]) == 0


def test_a_report_never_replaces_a_run_folders_own_files(tmp_path, straight, capsys):
    """--overwrite replaces reports, not the record, configuration or summary of the run a folder holds (a
    report over run.json left a run that could not be resumed); a report beside them is fine."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    own = {name: (run / name).read_bytes() for name in ("run.json", "config.json", "summary.json")}
    args = ["evaluate", "--model-dir", str(run), "--attacks", "fgsm", "-n", "8", "--no-progress", "--overwrite"]
    for name in ("run.json", "config.json", "summary.json", "Summary.json"):
        assert main(args + ["--out", str(run / name)]) == 2
        assert f"--out: {name} in {run} is a file of the run there, not a report" in capsys.readouterr().err
    resume = [a for a in args if a != "--overwrite"] + ["--resume", "--out", str(run / "config.json")]
    assert main(resume) == 2 and "is a file of the run there" in capsys.readouterr().err  # not read as a report
    assert {name: (run / name).read_bytes() for name in own} == own
    assert main(["evaluate", "--model-dir", str(run / "model.safetensors"), "-n", "4"]) == 2
    assert "--model-dir takes a run folder; " in capsys.readouterr().err  # a file: --weights, not --checkpoint's pick
    assert main(args + ["--out", str(run / "report.json")]) == 0 and (run / "report.json").is_file()


def test_a_full_disk_during_the_state_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, disk_full):
    import sirobust.train_state as tr  # where the training state is written
    real = tr.save_state
    saves = {"n": 0}

    def failing_second(path, state):
        saves["n"] += 1
        if saves["n"] == 2:
            disk_full(0)
        return real(path, state)

    monkeypatch.setattr(tr, "save_state", failing_second)
    run = tmp_path / "run"
    with pytest.raises(OutputError, match=r"cannot write .*train_state.pt.new.tmp: No space left on device"):
        fit(small(run), **QUIET)
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1
    assert leftovers(run) == []
    monkeypatch.undo()
    fit(small(run), resume=True, **QUIET)  # and the run goes on from it


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with RunFolder(tmp_path / "run", "train", "new"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / "run.json").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664


def test_output_checks_name_the_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    assert check_output_dir(tmp_path / "new" / "deep").is_dir()


def test_both_damaged_generations_are_named_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    fit(small(run, epochs=2, milestones=(2,)), **QUIET)
    for name in ("train_state.pt", "train_state.prev.pt"):
        (run / name).write_bytes(b"PK\x03\x04 not really")
    r = cli("train", "--out", str(run), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "train_state.pt" in r.stderr and "train_state.prev.pt" in r.stderr and "--overwrite" in r.stderr
