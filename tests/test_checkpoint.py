"""Weights round-trip through .safetensors with rebuild metadata; nothing is ever unpickled."""
import os
from pathlib import Path
import pickle

import pytest
import torch
from safetensors.torch import save_file

import sirobust
from sirobust.checkpoint import CheckpointError, read_metadata, save_model
from sirobust.models import build_model


def test_round_trip_rebuilds_the_same_model_from_the_file_alone(tmp_path):
    model = build_model("cnn-small", num_classes=7, in_channels=3, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7]).eval()
    path = save_model(model, tmp_path / "m.safetensors", model_name="cnn-small", dataset="cifar10")
    again = sirobust.load(path)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["model"] == "cnn-small" and meta["dataset"] == "cifar10" and meta["num_classes"] == "7"
    assert not again.training
    assert sirobust.load(tmp_path / "m.safetensors").num_classes == 7


def test_a_run_folder_loads_its_model_file(tmp_path):
    model = build_model("cnn-small")
    save_model(model, tmp_path / "model.safetensors", model_name="cnn-small")
    assert isinstance(sirobust.load(tmp_path), type(model))  # no best weights: the last epoch's


def test_a_run_folder_gives_the_weights_the_cli_evaluates(tmp_path):
    """sirobust.load(folder) and `evaluate --model-dir folder` score the same file: the best weights by default
    (they had differed: Python took the last epoch's, the CLI the best), the last with checkpoint="last"."""
    from types import SimpleNamespace

    from sirobust.cli.models import resolve_source
    torch.manual_seed(0)
    last, best = build_model("cnn-small"), build_model("cnn-small")
    save_model(last, tmp_path / "model.safetensors", model_name="cnn-small", dataset="fashion-mnist-mini")
    save_model(best, tmp_path / "best.safetensors", model_name="cnn-small", dataset="fashion-mnist-mini")
    x = torch.rand(2, 1, 28, 28)
    for checkpoint, expected in (("best", best), ("last", last)):
        got = sirobust.load(tmp_path, checkpoint=checkpoint)
        torch.testing.assert_close(got(x), expected.eval()(x), rtol=0, atol=0)
        flags = SimpleNamespace(model_dir=str(tmp_path), model_def=None, torchscript=None, weights=None,
                                mean=None, std=None, model_arg=None, checkpoint=checkpoint, dataset=None)
        assert resolve_source(flags).path.name == f"{'best' if checkpoint == 'best' else 'model'}.safetensors"
    torch.testing.assert_close(sirobust.load(tmp_path)(x), best(x), rtol=0, atol=0)  # the default is the best
    with pytest.raises(ValueError, match="checkpoint must be one of 'last', 'best', got 'final'"):
        sirobust.load(tmp_path, checkpoint="final")


def test_missing_foreign_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no weights file"):
        sirobust.load(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="no sirobust metadata"):
        sirobust.load(tmp_path / "foreign.safetensors")
    good = save_model(build_model("cnn-small"), tmp_path / "good.safetensors", model_name="cnn-small")
    data = bytearray(good.read_bytes())
    data[10:40] = b"\x00" * 30  # corrupt the header
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        sirobust.load(tmp_path / "bad.safetensors")


def test_a_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        sirobust.load(tmp_path)
    assert not marker.exists()


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = save_model(build_model("cnn-small"), tmp_path / "m.safetensors", model_name="cnn-small")
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(tmp_path / "lie.safetensors"), metadata={**meta, "model": "resnet18"})
    with pytest.raises(CheckpointError, match="do not match model 'resnet18'"):
        sirobust.load(tmp_path / "lie.safetensors")


@pytest.mark.parametrize("room", [0, 1000])
def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path, disk_full, room):
    path = save_model(build_model("cnn-small"), tmp_path / "m.safetensors", model_name="cnn-small")
    before = path.read_bytes()
    disk_full(room)
    from sirobust.io import OutputError
    with pytest.raises(OutputError) as e:
        save_model(build_model("cnn-small"), path, model_name="cnn-small")
    assert str(e.value) == f"cannot write {path}: No space left on device (is the disk full?)"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_a_cosine_head_model_is_rebuilt_with_its_cosine_head(tmp_path):
    from sirobust.models import CosineHead
    model = build_model("cnn-small").use_cosine_head(15.0).eval()
    x = torch.rand(3, 1, 28, 28)
    z = model.features(x)
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(model.head.weight, dim=1).t()
    torch.testing.assert_close(model(x), 15 * cos)
    again = sirobust.load(save_model(model, tmp_path / "he.safetensors", model_name="cnn-small"))
    assert isinstance(again.head, CosineHead) and again.head.scale == 15.0
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("field,value,match", [
    ("num_classes", None, "lacks 'num_classes'"), ("mean", "[0.5, 0.5]", "mean must list 1 finite numbers"),
    ("std", "[0]", "std must be positive"), ("model", "vgg", "names model 'vgg'"),
    ("in_channels", "1000", "in_channels=1000 is outside"), ("head", "magic", "head='magic'"),
])
def test_weights_with_missing_or_impossible_metadata_are_refused(tmp_path, field, value, match):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = save_model(build_model("cnn-small", in_channels=1), tmp_path / "m.safetensors", model_name="cnn-small")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        sirobust.load(tmp_path / "bad.safetensors")


def test_two_identical_trainings_in_two_processes_save_byte_identical_files(tmp_path):
    """The file's sha256 (what provenance and figure.json record) is a function of the tensors and metadata
    alone: safetensors' header order, which changes between processes, is made canonical (issue 21)."""
    import hashlib
    import os
    import subprocess
    import sys
    script = ("import sys; sys.path.insert(0, 'tests'); from helpers import small_config; from sirobust.train import fit; "
              "fit(small_config(sys.argv[1], epochs=1, train_n=128, val_n=32), log=lambda *a: None)")
    digests = []
    for k, hash_seed in enumerate(("1", "2")):  # hash maps iterate in another order in each process
        out = tmp_path / f"run{k}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=Path(__file__).resolve().parents[1],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    from sirobust.checkpoint import read_metadata
    assert read_metadata(tmp_path / "run0" / "model.safetensors")["model"] == "cnn-small"  # still a valid file


@pytest.mark.parametrize("dataset,said", [("cifar10", "3 channel(s) and 10 classes"),
                                          ("cifar100", "3 channel(s) and 100 classes")])
def test_a_dataset_the_model_cannot_take_is_refused_before_it_is_read(tmp_path, capsys, dataset, said):
    """Not a failed download of CIFAR for a Fashion-MNIST model: the shapes the weights record say no first."""
    from sirobust.cli import main
    weights = save_model(build_model("cnn-small", in_channels=1), tmp_path / "w.safetensors", model_name="cnn-small",
                         dataset="fashion-mnist-mini")
    assert main(["evaluate", "--weights", str(weights), "--dataset", dataset, "-n", "4", "--data-dir",
                 str(tmp_path / "nothing"), "--out", str(tmp_path / "r.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--dataset {dataset}: its images have {said}" in err and "(trained on fashion-mnist-mini) takes 1 and 10" in err
    assert err.count("\n") == 1 and not (tmp_path / "nothing").exists()
