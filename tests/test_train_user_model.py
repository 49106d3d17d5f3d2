"""Training a model of the user's own (``fit(config, model=...)``): trained in place with SI, its weights saved as
its state dict, the run resumed bit for bit, and what it cannot do refused before the run folder exists."""
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import sirobust
from sirobust.checkpoint import CheckpointError
from sirobust.features import FeatureAccessError
from sirobust.io import read_json, read_jsonl
from sirobust.train import fit

from helpers import small_config


class MyNet(nn.Module):
    """Normalises its own input, flattens with .view (no channels_last), a linear head that is not the last
    module registered, which it names for SI."""

    sirobust_head = "classifier"

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = nn.Linear(64, 10)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
        self.fc1 = nn.Linear(8 * 7 * 7, 64)

    def forward(self, x):
        h = self.body((x - 0.5) / 0.5)
        return self.classifier(F.relu(self.fc1(h.view(h.size(0), -1))))


def cfg(out, **kw):
    return small_config(out, **{"defense": "trades", "si": True, "epochs": 2, "milestones": (1,), **kw})


def test_a_users_model_trains_in_place_with_si_and_resumes_bit_for_bit(tmp_path):
    straight = MyNet()
    before = {k: v.clone() for k, v in straight.state_dict().items()}
    summary = fit(cfg(tmp_path / "straight"), model=straight, log=lambda *_: None)
    assert any(not torch.equal(before[k], v) for k, v in straight.state_dict().items())  # trained in place
    assert read_json(tmp_path / "straight" / "config.json")["config"]["model"] == "user:MyNet"
    assert summary["provenance"]["fast_path"]["channels_last"] is False  # its forward views
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all("loss_si" in r for r in rows)
    saved = safetensors.torch.load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in straight.state_dict().items())  # the weights as a state dict
    with pytest.raises(CheckpointError, match="a model of your own .*load_state_dict"):
        sirobust.load(tmp_path / "straight" / "model.safetensors")

    fit(cfg(tmp_path / "split", epochs=1), model=MyNet(), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"trains a model of your own \(user:MyNet\): give it again"):
        fit(cfg(tmp_path / "split"), resume=True, log=lambda *_: None)
    from sirobust.cli import main
    assert main(["train", "--out", str(tmp_path / "split"), "--resume"]) == 2  # the CLI says the same, no traceback
    again = MyNet(seed=5)  # another initialisation: the run's state replaces it
    fit(cfg(tmp_path / "split"), model=again, resume=True, log=lambda *_: None)
    for k, v in straight.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


class Probabilities(MyNet):
    def forward(self, x):
        return super().forward(x).softmax(1) * 2  # not a rescaling of the head's output


class EightClasses(MyNet):
    def forward(self, x):
        return super().forward(x)[:, :8]


@pytest.mark.parametrize("model,kw,error,message", [
    (EightClasses(), {}, ValueError, r"returns \(2, 8\) for 2 images of fashion-mnist-mini; it must return \(2, 10\)"),
    (Probabilities(), {}, FeatureAccessError, "not a positive multiple of its last linear layer 'classifier'"),
    (MyNet(), {"defense": "he", "si": False}, ValueError, "he cannot train a model of your own: .*only sirobust's own"),
    ("resnet18", {}, TypeError, "model must be a torch.nn.Module"),
])
def test_what_a_users_model_cannot_train_is_refused_before_the_run_folder(tmp_path, model, kw, error, message):
    with pytest.raises(error, match=message):
        fit(cfg(tmp_path / "run", **kw), model=model, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_the_command_line_trains_a_model_of_your_own_and_evaluates_its_weights(tmp_path):
    from sirobust.cli import main
    definition = tmp_path / "net.py"
    definition.write_text("import torch.nn as nn\n\n"
                          "def make(width=16):\n"
                          "    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))\n")
    run = tmp_path / "run"
    common = ["--defense", "at", "--with-si", "--epochs", "1", "--train-n", "64", "--val-n", "16", "--steps", "1",
              "--model-def", f"{definition}:make", "--model-arg", "width=8", "--no-progress", "--out", str(run)]
    assert main(["train", *common, "--head", "1"]) == 2  # the first linear layer: its output is not the logits
    assert main(["train", *common, "--head", "0"]) == 2  # Flatten: no linear layer
    assert not run.exists()  # both refused before the run folder
    assert main(["train", *common, "--head", "3"]) == 0
    assert read_json(run / "config.json")["config"]["model"] == "user:Sequential"
    assert main(["train", "--model-arg", "width=8", "--out", str(tmp_path / "x")]) == 2  # without --model-def
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model-def", f"{definition}:make", "--model-arg", "width=8", "--weights",
                 str(run / "model.safetensors"), "--dataset", "fashion-mnist-mini", "--attacks", "fgsm", "-n", "16",
                 "--no-progress", "--out", str(report)]) == 0
    assert read_json(report)["n"] == 16
