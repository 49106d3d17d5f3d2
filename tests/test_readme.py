"""The README runs as written: its Python example, its quick-start command lines, and its demo numbers
are the ones a demo run printed (generated from the committed demo.json, never retyped)."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import sirobust
from sirobust.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(heading: str, lang: str, nth: int = 0) -> str:
    section = README.split(heading, 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)[nth]


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, trained_cnn):
    # what `make demo` leaves behind, here a quickly trained model of the same kind
    save_model(trained_cnn, tmp_path / "runs" / "demo" / "trades" / "model.safetensors", model_name="cnn-small",
               dataset="fashion-mnist-mini")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block_after("## Python API", "python"), scope)
    x, x_adv, report = scope["x"], scope["x_adv"], scope["report"]
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert isinstance(report, sirobust.Report) and set(report.attacks) == {"pgd", "pgd-cw", "pgd-dlr", "si-pgd"}
    assert report.eps == pytest.approx(0.1) and report.worst_case_acc <= report.clean_acc


@pytest.mark.slow  # 40 s of subprocesses (the suite's budget); the Python example and the demo numbers stay in it
def test_readme_quick_start_commands_run_as_written(tmp_path):
    lines = [ln for ln in block_after("## Command line", "bash").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("sirobust ") for ln in lines)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    for line in lines:
        r = subprocess.run(shlex.split(line) + ["--no-progress"] * ("list" not in line), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stderr[-2000:])
    report = json.loads((tmp_path / "runs" / "at-report.json").read_text())
    assert report["n"] == 100 and report["worst_case_acc"] < report["clean_acc"]
    assert (tmp_path / "runs" / "at-rescale" / "rescale.png").exists()


def test_readme_demo_numbers_are_generated_from_a_demo_run():
    from sirobust.demo import render_results
    summary = json.loads((ROOT / "benchmarks" / "demo-results.json").read_text())
    block = re.search(r"<!-- demo-results:begin[^>]*-->\n(.*?)\n<!-- demo-results:end -->", README, re.S).group(1)
    assert block.strip() == render_results(summary).strip()
    assert not summary["quick"] and summary["epochs"] == 3


def test_the_made_on_line_names_the_thread_count_on_a_cpu_and_not_on_a_gpu():
    """The thread count changes a CPU's sums, hence the weights: a reader comparing digits needs it."""
    from sirobust.demo import made_on
    cpu = made_on({"environment": {"cpu": "AMD EPYC", "gpu": None, "torch": "2.13.0+cpu", "threads": 2}})
    assert cpu.startswith("Made on AMD EPYC (2 CPU threads) with torch 2.13.0+cpu.") and "thread counts" in cpu
    one = made_on({"environment": {"cpu": "AMD EPYC", "gpu": None, "torch": "2.13.0+cpu", "threads": 1}})
    assert "(1 CPU thread)" in one
    gpu = made_on({"environment": {"cpu": "x", "gpu": "NVIDIA H100", "torch": "2.11", "threads": 16}})
    assert gpu.startswith("Made on NVIDIA H100 with torch 2.11.") and "CPU thread" not in gpu
    old = made_on({"environment": {"cpu": "AMD EPYC", "gpu": None, "torch": "2.13.0+cpu"}})  # recorded before
    assert old.startswith("Made on AMD EPYC with torch")
