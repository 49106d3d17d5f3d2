"""Clean failures at the edges (issue 21): an interrupt while starting, a refused --out, a model factory that
exits. Each ends with one line, the right status, and nothing left behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sirobust.runfolder import LOCK_NAME, RunFolder, RunFolderError


# A Ctrl-C lands wherever the interpreter is; a real signal's timing races with imports that swallow it, so
# the interrupt is raised deterministically where it matters: while the named module is being imported.
INTERRUPT_AT = """
import runpy, sys
AT, HOW = sys.argv[1], sys.argv[2]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == AT:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
if HOW == "command":
    sys.argv = ["sirobust", "list"]
    runpy.run_module("sirobust", run_name="__main__", alter_sys=True)
else:
    import sirobust
"""


@pytest.mark.parametrize("module", ["torch", "sirobust.cli.args", "sirobust.cli.train"])
def test_an_interrupt_while_starting_is_one_line_and_status_130(module):
    """Importing torch takes seconds; a Ctrl-C then printed a 30-50-line traceback."""
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT, module, "command"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == ["sirobust: interrupted while starting; nothing was done"]


def test_a_library_import_keeps_the_callers_keyboard_interrupt():
    """Only the command turns it into exit 130: a script importing sirobust gets its KeyboardInterrupt."""
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT, "torch", "library"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 130 and "KeyboardInterrupt" in done.stderr


@pytest.mark.parametrize("case", ["other files", "resume nothing", "other kind"])
def test_a_refused_folder_is_left_exactly_as_it_was(tmp_path, case):
    folder = tmp_path / "out"
    folder.mkdir()
    mode, kind = "new", "train"
    if case == "other files":
        (folder / "notes.txt").write_text("mine")
    elif case == "resume nothing":
        mode = "resume"
    else:
        with RunFolder(folder, "evaluate", "new", config={}):
            (folder / "kept.json").write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises((RunFolderError, ValueError)):
        with RunFolder(folder, kind, mode, config={}):
            pass
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (LOCK_NAME in before) == (case == "other kind")   # no 0-byte lock file of the refused claim


def test_a_new_folder_refused_after_creation_is_removed(tmp_path, monkeypatch):
    folder = tmp_path / "fresh"

    def refuse(self):
        raise RunFolderError("refused for the test")
    monkeypatch.setattr(RunFolder, "_settle", refuse)
    with pytest.raises(RunFolderError):
        RunFolder(folder, "train", "new", config={}).claim()
    assert not folder.exists()


@pytest.mark.parametrize("where", ["factory", "module"])
def test_a_model_factory_that_exits_is_an_error_naming_it(tmp_path, where):
    definition = tmp_path / "net.py"
    body = "import sys\n" + ("sys.exit(0)\n" if where == "module" else "") + "def make():\n    sys.exit(0)\n"
    definition.write_text(body)
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "sirobust", "evaluate", "--model-def", f"{definition}:make",
                           "--dataset", "fashion-mnist-mini", "-n", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(definition) in lines[0] and "sys.exit(0)" in lines[0]
    assert not out.exists() and not out.with_suffix(".evaluation").exists()


# ------------------------------------------------------------------ messages that name the argument or file

def test_bad_milestones_name_the_flag_and_the_allowed_values():
    done = subprocess.run([sys.executable, "-m", "sirobust", "train", "--milestones", "abc"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "--milestones: takes comma-separated whole epochs >= 1 (e.g. 74,89), got 'abc'" in done.stderr
    assert "<lambda>" not in done.stderr


def test_load_on_a_missing_device_or_a_bad_name_is_a_clear_error(tmp_path):
    import torch

    import sirobust
    path = tmp_path / "m.safetensors"
    sirobust.save_model(sirobust.build_model("cnn-small", num_classes=10, in_channels=1), path,
                        model_name="cnn-small")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but this torch .* sees no CUDA device"):
            sirobust.load(path, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N'"):
        sirobust.load(path, device="bogus")


@pytest.mark.parametrize("key,value", [("num_classes", "ten"), ("mean", "[0.5,"), ("in_channels", "1.5")])
def test_bad_metadata_names_the_field(tmp_path, key, value):
    import json

    import sirobust
    from sirobust.checkpoint import CheckpointError
    path = tmp_path / "m.safetensors"
    sirobust.save_model(sirobust.build_model("cnn-small", num_classes=10, in_channels=1), path,
                        model_name="cnn-small")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    with pytest.raises(CheckpointError, match=f"metadata {key}="):
        sirobust.load(path)


def test_a_pickle_refusal_names_the_object_and_gives_no_unsafe_advice(tmp_path):
    import torch

    from sirobust.statefile import StateFileError, read_state

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(StateFileError) as e:
        read_state(path)
    msg = str(e.value)
    assert str(path) in msg and "system" in msg and "safe load refuses" in msg
    assert "weights_only" not in msg and msg.endswith(")")    # whole sentences, none of torch's advice


def test_split_val_with_a_config_without_the_split_is_a_clear_error(tmp_path):
    from helpers import small_config

    from sirobust.train import fit
    run = tmp_path / "run"
    fit(small_config(run, epochs=1, train_n=64, val_n=16), log=lambda *_: None)
    (run / "config.json").write_text("{}")
    done = subprocess.run([sys.executable, "-m", "sirobust", "evaluate", "--model-dir", str(run), "--split", "val",
                           "-n", "8", "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"--split val: {run / 'config.json'} records no validation split" in done.stderr
    assert "KeyError" not in done.stderr


def test_resume_without_run_json_says_it_is_missing(tmp_path, capsys):
    """A deleted run.json was reported as a list of config differences, as if the flags were wrong."""
    from sirobust.cli import main
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--no-progress"]
    assert main(common + ["--epochs", "1", "--train-n", "64", "--val-n", "16", "--lr", "0.02"]) == 0
    (out / "run.json").unlink()
    capsys.readouterr()
    assert main(common + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'run.json'} is missing" in err and "lr" in err


def test_sigterm_outside_a_graceful_block_exits_143_and_a_finished_blocks_signal_is_handed_on(capfd):
    import os
    import signal

    from sirobust.interrupts import Terminated, graceful_stop, take_pending_stop, terminate_as_interrupt
    saved = signal.getsignal(signal.SIGTERM)
    try:
        terminate_as_interrupt()
        with pytest.raises(KeyboardInterrupt) as caught:  # every cleanup runs, as for Ctrl-C
            os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(caught.value, Terminated) and caught.value.exit_code == 143
        with graceful_stop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
        # heard at once, though the job stops only at its next saved point
        assert "SIGTERM received; stopping after the current step" in capfd.readouterr().err
        assert take_pending_stop() == signal.SIGTERM and take_pending_stop() is None  # handed on once
        with graceful_stop():
            pass
        assert take_pending_stop() is None
        with pytest.raises(KeyboardInterrupt) as caught:  # a second signal stops at once, with its own status
            with graceful_stop():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
        assert isinstance(caught.value, Terminated) and caught.value.exit_code == 143
        take_pending_stop()
        capfd.readouterr()
        # with no stderr (closed at start), nothing is written: fd 2 may then be a file the job opened
        import sys
        real_stderr = sys.__stderr__
        sys.__stderr__ = None
        try:
            with graceful_stop() as stop:
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            sys.__stderr__ = real_stderr
        assert stop.name == "SIGTERM" and "received" not in capfd.readouterr().err
        take_pending_stop()
    finally:
        signal.signal(signal.SIGTERM, saved)
