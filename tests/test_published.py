"""Published defenses (Table 5): config entries checked, files checked by sha256 before anything is imported or
unpickled, RobustBench's layout, and the robustbench package (absent here; a fake one injected where needed)."""
import enum
import hashlib
import json
import os
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from sirobust.foreign.published import (INSTALL_HINT, PublishedModel, PublishedModelError, check_sha256,
                                            load_published, verify, weights_path)

# A definition file as a published repository ships it; every import and every factory call is logged beside it,
# so a test can prove that a refused file never got as far as the user's code.
DEFINITION = textwrap.dedent('''
    from pathlib import Path

    import torch
    from torch import nn

    LOG = Path(__file__).with_name("calls.log")
    with open(LOG, "a") as f:
        f.write("import\\n")


    class SmallCNN(nn.Module):
        def __init__(self, width=8, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(width * 4, num_classes)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


    def make_net(width=8, seed=0):
        with open(LOG, "a") as f:
            f.write("factory\\n")
        torch.manual_seed(seed)
        return SmallCNN(width=int(width))
''')


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _net(width=8, seed=0):
    ns = {"__file__": os.devnull}
    exec(DEFINITION.replace('Path(__file__).with_name("calls.log")', 'Path(__import__("os").devnull)'), ns)
    return ns["make_net"](width=width, seed=seed).eval()


@pytest.fixture
def published(tmp_path):
    """MODEL_DIR in RobustBench's layout: a plain state dict and a wrapped DataParallel checkpoint."""
    model_dir = tmp_path / "models"
    (model_dir / "defs").mkdir(parents=True)
    (model_dir / "defs" / "small_cnn.py").write_text(DEFINITION)
    folder = model_dir / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    plain, wrapped = _net(8, seed=1), _net(6, seed=2)
    torch.save(plain.state_dict(), folder / "Alpha2020Plain.pt")
    torch.save({"epoch": 99, "state_dict": {f"module.{k}": v for k, v in wrapped.state_dict().items()}},
               folder / "Beta2021Wrapped.pt")
    specs = {
        "plain": PublishedModel.from_dict({"name": "Alpha2020Plain", "definition": "defs/small_cnn.py:make_net",
                                           "sha256": _sha(folder / "Alpha2020Plain.pt"), "label": "AT [8]",
                                           "architecture": "CNN-8"}),
        "wrapped": PublishedModel.from_dict({"name": "Beta2021Wrapped", "definition": "defs/small_cnn.py:make_net",
                                             "sha256": _sha(folder / "Beta2021Wrapped.pt"), "args": {"width": 6},
                                             "label": "RST [27] †", "extra_data": True}),
    }
    return model_dir, specs, {"plain": plain, "wrapped": wrapped}


def _calls(model_dir):
    log = model_dir / "defs" / "calls.log"
    return log.read_text().split() if log.exists() else []


def _x(n=4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["plain", "wrapped"])
def test_load_gives_the_published_logits(published, which):
    model_dir, specs, originals = published
    model, prov = load_published(specs[which], model_dir)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(_x()), originals[which](_x()))
    assert prov["published_model"] == specs[which].name
    assert prov["weights_sha256"] == specs[which].sha256 and prov["sha256_checked"] is True
    assert prov["definition"] == f"{model_dir / 'defs' / 'small_cnn.py'}:make_net"
    assert prov["label"] == specs[which].label and "none added" in prov["normalisation"]
    assert _calls(model_dir) == ["import", "factory"]
    json.dumps(prov)  # goes into a report as it is


def test_normalisation_from_the_entry(published):
    model_dir, specs, originals = published
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    d = {"name": "Alpha2020Plain", "definition": str(model_dir / "defs" / "small_cnn.py") + ":make_net",
         "sha256": specs["plain"].sha256, "mean": mean, "std": std}
    model, prov = load_published(PublishedModel.from_dict(d), model_dir)
    x = _x()
    expected = originals["plain"]((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert "mean [0.5, 0.4, 0.3]" in prov["normalisation"]


def test_torchscript_entry(published):
    model_dir, _, originals = published
    path = model_dir / "cifar10" / "Linf" / "Gamma2022Script.pt"
    torch.jit.trace(originals["plain"], _x()).save(str(path))
    spec = PublishedModel.from_dict({"name": "Gamma2022Script", "torchscript": True, "sha256": _sha(path)})
    model, prov = load_published(spec, model_dir)
    with torch.no_grad():
        assert torch.equal(model(_x()), originals["plain"](_x()))
    assert prov["weights_sha256"] == spec.sha256


def test_wrong_sha256_stops_before_the_definition_is_imported(published):
    model_dir, specs, _ = published
    bad = PublishedModel.from_dict({**_as_dict(specs["plain"]), "sha256": "0" * 64})
    with pytest.raises(PublishedModelError) as e:
        load_published(bad, model_dir)
    msg = str(e.value)
    assert str(weights_path(bad, model_dir)) in msg and "0" * 64 in msg and specs["plain"].sha256 in msg
    assert _calls(model_dir) == []  # neither imported nor called


def test_verify_reports_every_bad_entry_before_any_load(published):
    model_dir, specs, _ = published
    wrong = PublishedModel.from_dict({**_as_dict(specs["plain"]), "sha256": "ab" * 32})
    missing = PublishedModel.from_dict({**_as_dict(specs["wrapped"]), "name": "Delta2023Missing"})
    no_def = PublishedModel.from_dict({**_as_dict(specs["wrapped"]), "name": "Eta2026NoDef",
                                       "weights": "cifar10/Linf/Beta2021Wrapped.pt",
                                       "definition": "defs/nope.py:make_net"})
    good = [specs["plain"], specs["wrapped"]]
    assert verify(good, model_dir) == []
    problems = verify([wrong, specs["wrapped"], missing, no_def], model_dir, raise_errors=False)
    assert len(problems) == 3, problems
    assert "model 0" in problems[0] and "ab" * 32 in problems[0]
    assert "model 2" in problems[1] and str(model_dir / "cifar10" / "Linf" / "Delta2023Missing.pt") in problems[1]
    assert "model 3" in problems[2] and "nope.py" in problems[2]
    with pytest.raises(PublishedModelError, match=r"3 of 4 published models cannot be used") as e:
        verify([wrong, specs["wrapped"], missing, no_def], model_dir)
    assert all(p in str(e.value) for p in problems)
    twice = verify([specs["plain"], specs["plain"]], model_dir, raise_errors=False)
    assert len(twice) == 1 and "listed twice" in twice[0]
    assert _calls(model_dir) == []


def test_missing_file_says_where_it_was_looked_for(published):
    model_dir, specs, _ = published
    spec = PublishedModel.from_dict({**_as_dict(specs["plain"]), "name": "Epsilon2024Gone", "label": "MART [16]"})
    expected = model_dir / "cifar10" / "Linf" / "Epsilon2024Gone.pt"
    assert weights_path(spec, model_dir) == expected
    with pytest.raises(PublishedModelError) as e:
        load_published(spec, model_dir)
    assert f"no file at {expected}" in str(e.value) and "put it at" in str(e.value) and spec.sha256 in str(e.value)
    with pytest.raises(PublishedModelError, match="no file at"):
        check_sha256(expected, None, "x")
    other = PublishedModel.from_dict({**_as_dict(spec), "weights": "elsewhere/mart.pth"})
    assert weights_path(other, model_dir) == model_dir / "elsewhere" / "mart.pth"


def test_a_pickle_that_runs_code_is_refused(published, tmp_path):
    model_dir, specs, _ = published
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = model_dir / "cifar10" / "Linf" / "Zeta2025Evil.pt"
    torch.save({"state_dict": Evil()}, path)
    spec = PublishedModel.from_dict({**_as_dict(specs["plain"]), "name": "Zeta2025Evil", "sha256": _sha(path)})
    with pytest.raises(PublishedModelError, match="Zeta2025Evil"):
        load_published(spec, model_dir)
    assert not marker.exists()


def _as_dict(spec):
    d = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}


@pytest.mark.parametrize("entry, key", [
    ({"name": "A", "robustbench": "A", "shaa256": "0" * 64}, "shaa256"),
    ({"name": "A", "robustbench": "A", "extra_data": "yes"}, "extra_data"),
    ({"name": "A", "robustbench": "A", "args": [1]}, "args"),
    ({"name": 3, "robustbench": "A"}, "name"),
    ({"name": "A", "robustbench": "A", "sha256": "abc"}, "sha256"),
    ({"name": "A", "robustbench": "A", "sha256": "g" * 64}, "sha256"),
    ({"name": "A", "definition": "net.py:make"}, "sha256"),  # required for a file-based model
    ({"name": "A", "definition": "net.py", "sha256": "0" * 64}, "definition"),
    ({"name": "A", "definition": "n.py:f", "sha256": "0" * 64, "mean": [0.5], "std": "x"}, "std"),
    ({"name": "A", "definition": "n.py:f", "sha256": "0" * 64, "mean": [0.5, True], "std": [1, 1]}, "mean"),
    ({"name": "A", "definition": "n.py:f", "sha256": "0" * 64, "mean": [0.5]}, "std"),
    ({"name": "../../etc", "robustbench": "A"}, "name"),
    ({"name": "A"}, "robustbench"),  # no way to get a model
    ({"robustbench": "A"}, "name"),
])
def test_from_dict_names_the_key_and_where(entry, key):
    with pytest.raises(PublishedModelError) as e:
        PublishedModel.from_dict(entry, where="table5.toml models[3]")
    assert str(e.value).startswith("table5.toml models[3]: ") and repr(key) in str(e.value), str(e.value)


def test_from_dict_accepts_toml_values():
    spec = PublishedModel.from_dict({"name": "Carmon2019Unlabeled", "robustbench": "Carmon2019Unlabeled",
                                     "sha256": "AB" * 32, "label": "RST [27] †", "architecture": "W-28-10",
                                     "extra_data": True})
    assert spec.sha256 == "ab" * 32 and spec.dataset == "cifar10" and spec.threat_model == "Linf"
    assert weights_path(spec, "models") == weights_path(spec, "models").__class__("models/cifar10/Linf/"
                                                                                  "Carmon2019Unlabeled.pt")
    s2 = PublishedModel.from_dict({"name": "M", "definition": "m.py:f", "sha256": "0" * 64, "mean": [0, 0, 0],
                                   "std": [1, 1, 1]})
    assert s2.mean == (0, 0, 0)
    from sirobust.reproduce import load_experiment  # the packaged Table 5 lists the RobustBench rows
    assert [m.robustbench for m in load_experiment("table5").models] == [
        "Engstrom2019Robustness", "Zhang2019Theoretically", "Hendrycks2019Using", "Carmon2019Unlabeled",
        "Wang2020Improving", "Sehwag2020Hydra"]


# --- robustbench ---------------------------------------------------------------------------------------------

def _rb_spec(name="Carmon2019Unlabeled", **kw):
    return PublishedModel.from_dict({"name": name, "robustbench": name, **kw})


def test_robustbench_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # as if not installed
    spec = _rb_spec()
    with pytest.raises(PublishedModelError) as e:
        load_published(spec, tmp_path)
    msg = str(e.value)
    assert "robustbench package is not installed" in msg and INSTALL_HINT in msg
    assert str(tmp_path / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt") in msg
    problems = verify([spec], tmp_path, raise_errors=False)
    assert len(problems) == 1 and "not installed" in problems[0]


def test_robustbench_installed_but_broken(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "robustbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import torchvision_is_not_here_xyz\n")
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(PublishedModelError, match="installed but cannot be imported.*torchvision_is_not_here_xyz"):
        load_published(_rb_spec(), tmp_path / "models")


class ZooNet(nn.Module):
    """A RobustBench-style model: its normalisation is buffers the constructor sets (absent from checkpoints)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.register_buffer("mu", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2, 0.2, 0.2]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4, 10)

    def forward(self, x):
        x = (x - self.mu) / self.sigma
        return self.linear(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def fake_robustbench(tmp_path, monkeypatch):
    """A robustbench package with one zoo model whose 'download' copies a prepared checkpoint."""
    trained = ZooNet()
    with torch.no_grad():
        trained.linear.weight.mul_(3.0)  # not what the constructor gives
    state = {f"module.{k}": v for k, v in trained.state_dict().items() if k not in ("mu", "sigma")}
    source = tmp_path / "gdrive" / "zoo.pt"
    source.parent.mkdir()
    torch.save({"state_dict": state}, source)
    calls = {"download": [], "load_model": []}

    class BenchmarkDataset(enum.Enum):
        cifar_10 = "cifar10"

    class ThreatModel(enum.Enum):
        Linf = "Linf"

    def download_gdrive_new(gdrive_id, fname):
        calls["download"].append((gdrive_id, str(fname)))
        behaviour = calls.get("behaviour", "ok")
        if behaviour == "offline":
            raise ConnectionError("Failed to resolve 'drive.google.com'")
        with open(fname, "wb") as f:
            f.write(b"<!DOCTYPE html><html>quota</html>" if behaviour == "html" else source.read_bytes())

    def load_model(*args, **kw):  # sirobust must never let robustbench unpickle
        calls["load_model"].append((args, kw))
        raise AssertionError("robustbench.utils.load_model was called")

    mods = {name: types.ModuleType(name) for name in
            ("robustbench", "robustbench.utils", "robustbench.model_zoo", "robustbench.model_zoo.enums")}
    mods["robustbench"].__version__ = "0.0-fake"
    mods["robustbench.utils"].download_gdrive_new = download_gdrive_new
    mods["robustbench.utils"].load_model = load_model
    mods["robustbench.model_zoo.enums"].BenchmarkDataset = BenchmarkDataset
    mods["robustbench.model_zoo.enums"].ThreatModel = ThreatModel
    mods["robustbench.model_zoo"].model_dicts = {BenchmarkDataset.cifar_10: {ThreatModel.Linf: {
        "Gamma2022Zoo": {"model": ZooNet, "gdrive_id": "1abc"},
        "Ensemble2020": {"model": ZooNet, "gdrive_id": ["1", "2"]}}}}
    mods["robustbench"].utils = mods["robustbench.utils"]
    mods["robustbench"].model_zoo = mods["robustbench.model_zoo"]
    mods["robustbench.model_zoo"].enums = mods["robustbench.model_zoo.enums"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return trained.eval(), _sha(source), calls


def test_robustbench_download_then_weights_only_load(tmp_path, fake_robustbench):
    trained, sha, calls = fake_robustbench
    model_dir = tmp_path / "models"
    spec = _rb_spec("Gamma2022Zoo", sha256=sha, label="HYDRA [28] †")
    assert verify([spec], model_dir) == []  # robustbench can fetch it: not a problem yet
    model, prov = load_published(spec, model_dir)
    path = model_dir / "cifar10" / "Linf" / "Gamma2022Zoo.pt"
    assert path.is_file() and _sha(path) == sha and calls["download"][0][0] == "1abc"
    assert not calls["load_model"]
    with torch.no_grad():
        assert torch.equal(model(_x()), trained(_x()))
    assert prov["robustbench"] == "Gamma2022Zoo" and prov["kept_from_definition"] == ["mu", "sigma"]
    assert prov["weights_sha256"] == sha and prov["robustbench_version"] == "0.0-fake"
    load_published(spec, model_dir)  # the file is there now: no second download
    assert len(calls["download"]) == 1


def test_robustbench_download_checked(tmp_path, fake_robustbench):
    _, sha, calls = fake_robustbench
    model_dir = tmp_path / "models"
    path = model_dir / "cifar10" / "Linf" / "Gamma2022Zoo.pt"
    with pytest.raises(PublishedModelError, match=f"expected {'c' * 64}"):
        load_published(_rb_spec("Gamma2022Zoo", sha256="c" * 64), model_dir)
    assert not path.exists() and not list(path.parent.iterdir())  # neither the file nor a partial one
    calls["behaviour"] = "offline"
    with pytest.raises(PublishedModelError, match=r"downloading RobustBench's checkpoint failed \(ConnectionError"):
        load_published(_rb_spec("Gamma2022Zoo"), model_dir)
    with pytest.raises(PublishedModelError, match="downloading"):
        verify([_rb_spec("Gamma2022Zoo")], model_dir, download=True)
    calls["behaviour"] = "html"
    with pytest.raises(PublishedModelError, match="not a weights file"):
        load_published(_rb_spec("Gamma2022Zoo"), model_dir)
    assert not list(path.parent.iterdir())
    with pytest.raises(PublishedModelError, match="model zoo has no 'Gamma2022Zo0'.*close: Gamma2022Zoo"):
        load_published(_rb_spec("Gamma2022Zo0"), model_dir)
    with pytest.raises(PublishedModelError, match="ensemble"):
        load_published(_rb_spec("Ensemble2020"), model_dir)
    assert not calls["load_model"]


# --- command line -------------------------------------------------------------------------------------------

def test_cli_robustbench_not_installed(tmp_path, monkeypatch, capsys):
    from sirobust.cli import main
    monkeypatch.setitem(sys.modules, "robustbench", None)
    rc = main(["evaluate", "--robustbench", "Carmon2019Unlabeled", "--model-dir", str(tmp_path / "models"),
               "--out", str(tmp_path / "r.json"), "-n", "2", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "robustbench package is not installed" in err and INSTALL_HINT in err, err
    assert str(tmp_path / "models" / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt") in err


@pytest.mark.parametrize("extra, words", [
    (["--model-def", "net.py:make"], "--robustbench NAME cannot go with --model-def"),
    (["--mean", "0.5", "--std", "0.2"], "--mean/--std"),
])
def test_cli_robustbench_excludes_other_sources(tmp_path, capsys, extra, words):
    from sirobust.cli import main
    rc = main(["evaluate", "--robustbench", "Carmon2019Unlabeled", *extra, "--out", str(tmp_path / "r.json")])
    assert rc == 2 and words in capsys.readouterr().err


def test_cli_threat_model_needs_robustbench(tmp_path, capsys):
    from sirobust.cli import main
    rc = main(["evaluate", "--model-dir", str(tmp_path), "--threat-model", "L2", "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "go with --robustbench" in capsys.readouterr().err


def test_cli_evaluates_a_robustbench_model(tmp_path, monkeypatch, fake_robustbench, capsys):
    """The whole path with the fake package: download, weights-only load, attacks, provenance in the report."""
    from sirobust.cli import main
    _, sha, calls = fake_robustbench

    class OneChannel(ZooNet):  # the bundled data is greyscale; the zoo entry takes it as CIFAR-10's would
        def forward(self, x):
            return super().forward(x.expand(-1, 3, -1, -1))

    zoo = sys.modules["robustbench.model_zoo"].model_dicts
    next(iter(next(iter(zoo.values())).values()))["Gamma2022Zoo"]["model"] = OneChannel
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--robustbench", "Gamma2022Zoo", "--model-dir", str(tmp_path / "models"),
               "--dataset", "fashion-mnist-mini", "--robustbench-dataset", "cifar10", "--attacks", "pgd,si-pgd",
               "--steps", "2", "-n", "8", "--batch-size", "8", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    prov = json.loads(out.read_text())["provenance"]
    assert prov["published_model"] == "Gamma2022Zoo" and prov["weights_sha256"] == sha
    assert prov["model"].startswith("RobustBench Gamma2022Zoo") and not calls["load_model"]
