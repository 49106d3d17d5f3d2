"""benchmarks/gpu_check.sh, the one-command GPU check (issue 22), cannot rot: its --quick form runs here on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch
    check = gpu_check.Check(torch.device("cpu"))
    check.step("fine", lambda: ["ok"])

    def broken():
        raise RuntimeError("a CUDA path raised")
    check.step("broken", broken)
    assert check.failures == ["broken"]
    text = "\n".join(check.sections)
    assert "**FAILED**" in text and "a CUDA path raised" in text and "ok" in text


def test_the_full_check_refuses_to_run_without_cuda(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu"])
    assert e.value.code == 2
    assert "--quick" in capsys.readouterr().err


def test_a_check_stopped_midway_leaves_the_steps_it_finished(tmp_path, monkeypatch):
    """A device window ends when it ends: gpu.md is rewritten after every step, so a check killed by a time
    limit still leaves what it measured, and says how many steps did not finish."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for step in ("pgd_speed", "train_speed", "bf16_accuracy"):
        monkeypatch.setattr(gpu_check, step, lambda *a, name=step: [f"{name} measured"])

    def killed(*a):
        raise KeyboardInterrupt  # what a time limit's signal becomes

    monkeypatch.setattr(gpu_check, "autoattack", killed)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--quick", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    assert "6 step(s) not finished" in text  # AutoAttack and the five branch steps
    assert all(f"{s} measured" in text for s in ("pgd_speed", "train_speed", "bf16_accuracy"))
    assert not (tmp_path / "gpu.md.tmp").exists()


def test_steps_runs_only_the_steps_named_and_refuses_unknown_ones(tmp_path, monkeypatch, capsys):
    """After a device window cut the check short, a second call runs the steps it did not finish."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ran = []
    for step in ("pgd_speed", "train_speed", "bf16_accuracy", "autoattack", "host_sync_branch",
                 "deterministic_branch", "torchrun_branch", "compile_evaluate_branch", "compile_fit_branch"):
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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_train


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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_pgd
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
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
