"""benchmarks/gpu_check.sh, the one-command GPU check (issue 22), cannot rot: its --quick form runs here on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(module: str):
    """A module of benchmarks/ (which is not a package), imported with that folder on the path for the import."""
    import importlib
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_quick_check_runs_every_step_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU check (quick smoke test): every step ran")
    for section in ("sirobust fp32, bf16 and torchattacks", "AT epoch", "bf16 against fp32", "Standard AutoAttack",
                    "Host sync every k steps", "Deterministic training", "torchrun and the process group",
                    "torch.compile in evaluate", "torch.compile in fit"):
        assert f"{section}" in text, section
    assert "FAILED" not in text
    for name in ("apgd-ce", "fab-t", "square"):                 # each loop's sync-every-k row
        assert f"| {name} " in text and "host sync every 4" in text, name
    assert "verdicts differ from the single process's on 0 of 16" in text   # torchrun --nproc_per_node 1 agreed
    # the collectives ran through a real (gloo) process group under torchrun
    assert ("a gloo process group of 1: Group's gather, broadcast, any, sum, barrier, broadcast_buffers, first "
            "returned what they should, through ") in text
    assert not (ROOT / "benchmarks" / "gpu.md").exists() or "quick" not in (ROOT / "benchmarks" / "gpu.md").read_text()


def test_a_failing_step_is_recorded_and_fails_the_check(monkeypatch):
    gpu_check = _bench("gpu_check")
    import torch
    check = gpu_check.Check(torch.device("cpu"))
    check.step("fine", lambda: ["ok"])

    def broken():
        raise RuntimeError("a CUDA path raised")
    check.step("broken", broken)
    assert check.failures == ["broken"]
    text = "\n".join(check.sections)
    assert "**FAILED**" in text and "a CUDA path raised" in text and "ok" in text


def test_the_full_check_refuses_to_run_without_cuda(capsys, tmp_path):
    gpu_check = _bench("gpu_check")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "gpu.md")])
    assert e.value.code == 2
    assert "--quick" in capsys.readouterr().err
    assert "No CUDA device" in (tmp_path / "gpu.md").read_text()  # a caller that reads only the file learns why


def test_a_check_stopped_midway_leaves_the_steps_it_finished(tmp_path, monkeypatch):
    """A device window ends when it ends: gpu.md is rewritten after every step, so a check killed by a time
    limit still leaves what it measured, and says how many steps did not finish."""
    gpu_check = _bench("gpu_check")
    for step in ("pgd_speed", "train_speed", "bf16_accuracy"):
        monkeypatch.setattr(gpu_check, step, lambda *a, name=step: [f"{name} measured"])

    def killed(*a):
        raise KeyboardInterrupt  # what a time limit's signal becomes

    monkeypatch.setattr(gpu_check, "autoattack", killed)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert "7 step(s) not finished" in text  # AutoAttack, the five branch steps and the reference
    assert ("`bash benchmarks/gpu_check.sh --steps autoattack,sync,deterministic,torchrun,compile-evaluate,"
            "compile-fit,aa-reference --out rest.md`") in text  # what to run in the next window
    assert all(f"{s} measured" in text for s in ("pgd_speed", "train_speed", "bf16_accuracy"))
    assert not (tmp_path / "gpu.md.tmp").exists()


def _gpu_check():
    return _bench("gpu_check")


STEP_FUNCTIONS = ("pgd_speed", "train_speed", "bf16_accuracy", "autoattack", "host_sync_branch",
                  "deterministic_branch", "torchrun_branch", "compile_evaluate_branch", "compile_fit_branch",
                  "aa_reference")


def test_a_check_killed_in_its_first_step_leaves_the_device_and_what_to_run(tmp_path, monkeypatch):
    gpu_check = _gpu_check()

    def killed(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpu_check, "pgd_speed", killed)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert "10 step(s) not finished" in text and "Device CPU" in text and "--steps pgd,train," in text


def test_the_budget_leaves_out_the_steps_that_would_end_past_it(tmp_path, monkeypatch):
    """A step is not started when its estimate would end past --budget: the report names it and the command that
    runs it, and the exit status (3) says the check is incomplete. --quick scales the estimates by 0.1."""
    gpu_check = _gpu_check()
    ran = []
    for step in STEP_FUNCTIONS:
        monkeypatch.setattr(gpu_check, step, lambda *a, name=step: ran.append(name) or [f"{name} measured"])
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out), "--budget", "10"]) == 3
    assert "autoattack" not in ran and "aa_reference" not in ran and "pgd_speed" in ran  # 12 s each > 10 s
    text = out.read_text()
    assert text.startswith("# GPU check (quick smoke test): 2 step(s) left out by the time budget; the others ran")
    assert "--steps autoattack,aa-reference --out rest.md" in text and "would end past the budget (10 s)" in text
    with pytest.raises(SystemExit):
        gpu_check.main(["--quick", "--device", "cpu", "--budget", "0"])


def test_a_peer_that_raises_leaves_sirobusts_rows(monkeypatch):
    """torchattacks failing at run time (not at import) costs its row, not the step: sirobust's rows stand."""
    gpu_check = _gpu_check()
    import types
    import torch
    import bench_gpu

    class Broken:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a):
            raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(bench_gpu, "import_torchattacks", lambda notes=None: types.SimpleNamespace(PGD=Broken))
    a = types.SimpleNamespace(device=torch.device("cpu"), quick=True,
                              **{k: quick for k, (_full, quick) in gpu_check.SIZES.items()})
    state = {}
    text = "\n".join(gpu_check.pgd_speed(a, torch.device("cpu"), state))
    assert "torchattacks PGD raised RuntimeError: CUDA error: an illegal memory access (no row)" in text
    assert "| sirobust PGD (all steps) |" in text and "no torchattacks row to compare with" in text


def test_torch_compile_that_cannot_run_on_the_image_says_why(monkeypatch, tmp_path):
    gpu_check = _gpu_check()
    import shutil
    import sysconfig
    import torch
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "no C compiler" in gpu_check.compile_blocker(torch.device("cpu"), {})
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})  # no Python.h there
    assert "no Python.h" in gpu_check.compile_blocker(torch.device("cpu"), {})
    state = {"compile_blocker": "found before"}
    assert gpu_check.compile_blocker(torch.device("cpu"), state) == "found before"  # once per check


def test_a_torchrun_that_hangs_is_killed_with_its_worker():
    gpu_check = _gpu_check()
    import time
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish in 1 s"):
        gpu_check.run_group([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                            dict(os.environ), timeout=1)
    assert time.perf_counter() - t0 < 30  # the grandchild holding the pipe was killed too


def test_steps_runs_only_the_steps_named_and_refuses_unknown_ones(tmp_path, monkeypatch, capsys):
    """After a device window cut the check short, a second call runs the steps it did not finish."""
    gpu_check = _bench("gpu_check")
    ran = []
    for step in STEP_FUNCTIONS:
        monkeypatch.setattr(gpu_check, step, lambda *a, name=step: ran.append(name) or [f"{name} measured"])
    out = tmp_path / "rest.md"
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(out),
                           "--steps", "compile-evaluate,compile-fit"]) == 0
    assert ran == ["compile_evaluate_branch", "compile_fit_branch"]
    text = out.read_text()
    assert "every step ran (--steps compile-evaluate,compile-fit only)" in text and "pgd_speed" not in text
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--quick", "--device", "cpu", "--steps", "pgd,compile"])
    assert e.value.code == 2 and "unknown step compile (allowed: pgd, train" in capsys.readouterr().err


def _bench_train():
    return _bench("bench_train")


@pytest.mark.parametrize("n,batch_size", [(10000, 128), (1024, 128), (100, 128), (130, 128), (16, 8)])
def test_the_training_warmup_size_meets_every_batch_shape_of_the_epoch(n, batch_size):
    """The timed AT epoch must not autotune (cudnn.benchmark) a shape the warm-up never met: 10,000 images in
    batches of 128 end with a batch of 16."""
    def shapes(m):
        return {min(batch_size, m - start) for start in range(0, m, batch_size)}
    m = _bench_train().warmup_size(n, batch_size)
    assert shapes(m) == shapes(n) and m <= n and m < 2 * batch_size


def test_both_epochs_warm_up_on_every_batch_shape(monkeypatch):
    """fit's warm-up trains on warmup_size images of the same split, and the plain loop's warm-up steps on a
    full batch and the epoch's last, partial one (20 images in batches of 8: 8, 8 and 4)."""
    import torch
    bench_train = _bench_train()
    dataset = bench_train.random_cifar_like(20 + bench_train.VAL_N)
    cfg = bench_train.train_config("cifar10", "cnn-small", "at", 20, 8, "cpu", attack_steps=1)
    fits = []
    monkeypatch.setattr(bench_train, "fit", lambda c, **kw: fits.append(c.train_n) or {"last": {}})
    bench_train.sirobust_epoch(dataset, cfg)
    assert fits == [12, 20]
    whole = bench_train.train_config("cifar10", "cnn-small", "at", None, 8, "cpu", attack_steps=1)
    fits.clear()
    bench_train.sirobust_epoch(dataset, bench_train.dataclasses.replace(whole, val_size=0))  # fit's whole set
    assert fits == [8 + len(dataset) % 8, None]
    steps = []
    monkeypatch.setattr(bench_train, "plain_step", lambda model, opt, x, y, *a: steps.append(len(y)) or torch.zeros(()))
    bench_train.plain_epoch(bench_train.training_images(dataset, cfg), cfg.resolved(), torch.device("cpu"))
    assert steps == [8, 4, 8, 8, 4]  # the warm-up, then the timed epoch


def test_torchattacks_imports_without_scipy(tmp_path, monkeypatch):
    """The device's image has no scipy, which torchattacks' package imports at the top (TIFGSM, OnePixel): the
    check imports it with stand-ins that raise if used, says so, and leaves no fake scipy behind."""
    bench_pgd = _bench("bench_pgd")
    package = tmp_path / "torchattacks"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from scipy import stats as st\n"
        "from scipy.optimize import OptimizeResult, minimize\n"
        "from scipy._lib._util import check_random_state\n"
        "def PGD():\n    return 'pgd'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchattacks", raising=False)
    for name in ("scipy", "scipy.stats", "scipy.optimize", "scipy._lib", "scipy._lib._util"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import scipy" raises ImportError
    notes = []
    torchattacks = bench_pgd.import_torchattacks(notes)
    assert torchattacks.PGD() == "pgd" and any("scipy is not installed" in n for n in notes)
    with pytest.raises(RuntimeError, match="stand-in"):
        torchattacks.minimize()
    with pytest.raises(RuntimeError, match="stand-in"):
        torchattacks.st.norm()
    assert "scipy" not in sys.modules and "scipy.optimize" not in sys.modules
    monkeypatch.delitem(sys.modules, "torchattacks")


def test_the_real_torchattacks_imports_without_scipy_and_its_scipy_attacks_say_why_they_fail():
    pytest.importorskip("torchattacks")
    code = ("import sys; sys.modules['scipy'] = None\n"  # as on an image without scipy
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "import torch, bench_pgd\n"
            "notes = []\n"
            "ta = bench_pgd.import_torchattacks(notes)\n"
            "assert notes and 'scipy' not in sys.modules, notes\n"
            "model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))\n"
            "x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])\n"
            "adv = ta.PGD(model, eps=0.1, alpha=0.05, steps=2)(x, y)\n"
            "assert (adv - x).abs().max() <= 0.1 + 1e-6\n"
            "try:\n    ta.TIFGSM(model)\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: scipy is not installed" in done.stdout
