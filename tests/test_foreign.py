"""Any user's model from the command line: a definition file and its weights, a TorchScript archive;
hostile weights are refused and never run."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from sirobust.foreign import ModelLoadError, build_user_model, identify, load_weights, unwrap_state_dict

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """A user's classifier for 28x28 greyscale images; it normalises nothing itself."""

        def __init__(self, width: int = 8, num_classes: int = 10):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc1 = nn.Linear(width * 16, 32)
            self.classifier = nn.Linear(32, num_classes)

        def forward_features(self, x):
            return torch.relu(self.fc1(self.pool(torch.relu(self.conv(x))).flatten(1)))

        def forward(self, x):
            return self.classifier(self.forward_features(x))


    def make_net(width=8):
        torch.manual_seed(0)
        return Net(width=int(width))
''')


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sirobust.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A model class in a file, briefly trained so that it classifies, its state dict saved as DataParallel would."""
    d = tmp_path_factory.mktemp("user")
    (d / "net.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(d))
    try:
        import importlib
        net_mod = importlib.import_module("net")
        model = net_mod.make_net(width=8)
    finally:
        sys.path.remove(str(d))
    from sirobust.data import load_dataset
    ds = load_dataset("fashion-mnist-mini", "train")
    x, y = ds.float_images()[:2000], ds.labels[:2000]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, 2000, 100):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, d / "net.pt")
    scripted = torch.jit.script(model)
    scripted.save(str(d / "net.ts"))
    return d, model


def _report(path):
    return json.loads(path.read_text())


def test_a_definition_file_and_a_wrapped_state_dict_evaluate_from_the_cli(tmp_path, user_model):
    d, model = user_model
    out = tmp_path / "r.json"
    r = cli("evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--model-arg", "width=8", "--weights",
            str(d / "net.pt"), "--dataset", "fashion-mnist-mini", "--attacks", "pgd,si-pgd", "-n", "60",
            "--steps", "5", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = _report(out)
    assert rep["clean_acc"] > 0.5  # the trained weights were loaded, not a fresh init
    assert rep["attacks"]["pgd"]["robust_acc"] < rep["clean_acc"]
    assert rep["attacks"]["si-pgd"]["robust_acc"] < rep["clean_acc"]
    p = rep["provenance"]
    assert p["model"] == f"{d / 'net.py'}:make_net({{\"width\": 8}})"
    assert p["weights_sha256"] == __import__("hashlib").sha256((d / "net.pt").read_bytes()).hexdigest()
    assert p["normalisation"].startswith("none added: the model is given pixels in [0, 1]")
    with torch.no_grad():  # the same numbers as the model object itself
        from sirobust.data import load_dataset
        ds = load_dataset("fashion-mnist-mini", "test")
        direct = (model(ds.float_images()[:60]).argmax(1) == ds.labels[:60]).tolist()
    assert rep["clean_correct"] == direct


def test_mean_and_std_wrap_the_model_and_are_recorded(tmp_path, user_model, capsys, monkeypatch):
    d, _ = user_model
    from sirobust.cli import main
    monkeypatch.chdir(tmp_path)
    # the wrapper's "model." prefix stays out of an error about the user's own layer name
    assert main(["evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--weights", str(d / "net.pt"), "--dataset",
                 "fashion-mnist-mini", "--mean", "0.5", "--std", "0.25", "--attacks", "si-pgd", "-n", "4",
                 "--head", "body.3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--head: no layer named 'body.3' in the model; its linear layers: fc1, classifier" in err, err
    assert "model." not in err
    assert main(["evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--weights", str(d / "net.pt"), "--dataset",
                 "fashion-mnist-mini", "--mean", "0.5", "--std", "0.25", "--attacks", "si-pgd", "-n", "4",
                 "--head", "conv", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--head: a Conv2d, not a linear layer: 'conv' in the model" in err and "model." not in err, err
    out = tmp_path / "r.json"
    r = cli("evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--weights", str(d / "net.pt"), "--dataset",
            "fashion-mnist-mini", "--mean", "0.5", "--std", "0.25", "--attacks", "fgsm", "-n", "20", "--out",
            str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mean [0.5], std [0.25]" in _report(out)["provenance"]["normalisation"]
    r = cli("evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--dataset", "fashion-mnist-mini", "--mean", "0.5",
            cwd=tmp_path)
    assert r.returncode == 2 and "--mean and --std go together" in r.stderr


def test_a_torchscript_archive_evaluates_with_pgd_and_si_pgd(tmp_path, user_model):
    d, _ = user_model
    out = tmp_path / "r.json"
    r = cli("evaluate", "--model", str(d / "net.ts"), "--dataset", "fashion-mnist-mini", "--attacks", "pgd,si-pgd",
            "-n", "60", "--steps", "5", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = _report(out)
    assert rep["clean_acc"] > 0.5 and rep["attacks"]["si-pgd"]["robust_acc"] < rep["clean_acc"]
    assert rep["provenance"]["model"] == "TorchScript net.ts"


def test_si_pgd_on_a_torchscript_model_without_features_says_what_to_export(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    torch.jit.script(Plain()).save(str(tmp_path / "p.ts"))
    r = cli("evaluate", "--model", str(tmp_path / "p.ts"), "--dataset", "fashion-mnist-mini", "--attacks",
            "pgd,si-pgd", "-n", "10", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "attack 'si-pgd' cannot run on this model" in r.stderr and "forward_features" in r.stderr


@pytest.mark.parametrize("fmt", ["bare", "torch"])
def test_a_malicious_pickle_as_weights_is_refused_and_never_runs(tmp_path, user_model, fmt):
    d, _ = user_model
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    if fmt == "bare":
        evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    else:
        torch.save({"state_dict": Evil()}, evil)
    r = cli("evaluate", "--model-def", f"{d / 'net.py'}:make_net", "--weights", str(evil), "--dataset",
            "fashion-mnist-mini", "-n", "5", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(evil) in r.stderr
    assert not marker.exists()


def test_weights_files_are_identified_by_content_and_unwrapped(tmp_path):
    sd = {"a.weight": torch.zeros(2, 2), "a.bias": torch.zeros(2)}
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "w.bin")
    import safetensors.torch
    safetensors.torch.save_file(sd, str(tmp_path / "w.pt"))  # the name lies: content decides
    (tmp_path / "w.txt").write_text("not weights")
    assert identify(tmp_path / "w.bin") == "torch-zip" and identify(tmp_path / "w.pt") == "safetensors"
    assert set(load_weights(tmp_path / "w.bin")) == set(sd) == set(load_weights(tmp_path / "w.pt"))
    with pytest.raises(ModelLoadError, match="neither a safetensors file nor a PyTorch weights file"):
        load_weights(tmp_path / "w.txt")
    with pytest.raises(ModelLoadError, match="holds no state dict of tensors"):
        unwrap_state_dict({"epoch": 3}, tmp_path / "x")


def test_definition_errors_are_one_line(tmp_path):
    (tmp_path / "m.py").write_text("import torch\ndef make(width):\n    return torch.nn.Linear(width, 2)\n")
    with pytest.raises(ModelLoadError, match="FILE.py:FACTORY"):
        build_user_model("m.py")
    with pytest.raises(ModelLoadError, match="defines no callable 'nope'; it has make"):
        build_user_model(f"{tmp_path / 'm.py'}:nope")
    with pytest.raises(ModelLoadError, match="pass its arguments with --model-arg"):
        build_user_model(f"{tmp_path / 'm.py'}:make")
    model, prov = build_user_model(f"{tmp_path / 'm.py'}:make", model_args={"width": 3})
    assert model.in_features == 3 and not model.training
