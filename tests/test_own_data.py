"""A dataset of your own (``register_dataset``): trained on by name like a built-in one, with a zoo model or a model
of your own, its ε the default of what is evaluated on it; images of any height and width; what is not 8-bit
images with integer labels is refused."""
import uuid

import pytest
import torch

import sirobust
from sirobust.data import get_dataset_info, list_datasets, load_dataset, register_dataset
from sirobust.data.registry import DATASETS
from sirobust.train import TrainConfig, fit


@pytest.fixture
def name():
    name = f"own-{uuid.uuid4().hex[:8]}"
    yield name
    if DATASETS.get(name, None) is not None:
        del DATASETS[name]  # the registry is the process's: other tests list the built-in datasets


@pytest.fixture(scope="module")
def mini():
    train, test = load_dataset("fashion-mnist-mini", "train"), load_dataset("fashion-mnist-mini", "test")
    return train.images[:192], train.labels[:192], test.images[:48], test.labels[:48]


def test_a_registered_dataset_trains_and_evaluates_by_name(tmp_path, name, mini):
    x, y, xt, yt = mini
    info = register_dataset(name, train=(x.float() / 255, y), test=(xt, yt), eps=0.1)  # float 8-bit pixels too
    assert name in list_datasets() and (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert info.mean[0] == pytest.approx(x.float().div(255).mean().item(), abs=1e-6)
    assert torch.equal(load_dataset(name, "train").images, x)  # exactly the pixels given
    fit(TrainConfig(dataset=name, model="cnn-small", defense="at", si=True, epochs=1, val_n=32, val_steps=1,
                    attack_steps=1, out=str(tmp_path / "run"), progress=False), log=lambda *_: None)
    model = sirobust.load(tmp_path / "run" / "model.safetensors")
    test = load_dataset(name, "test")
    report = sirobust.evaluate(model, (test.float_images(), test.labels), attacks=["pgd"], steps=2, progress=False)
    assert report.eps == 0.1 and report.n == 48  # the registered budget: the model records its dataset
    assert report.attacks["pgd"].robust_acc <= report.clean_acc


def test_what_is_not_8_bit_images_with_integer_labels_is_refused(name, mini):
    x, y, _, _ = mini
    bad = [(dict(train=(x.float() / 255 + 1e-3, y)), ValueError, "whole multiples of 1/255"),
           (dict(train=(x[:, 0], y)), ValueError, r"a \(N, C, H, W\) tensor"),
           (dict(train=(x, y.float())), TypeError, "integer tensor"),
           (dict(train=(x, y), classes=["a", "b"]), ValueError, r"labels must be in \[0, 2\)"),
           (dict(train=(x, y), augment="rotate"), ValueError, "augment must be one of none, crop, flip, crop-flip"),
           (dict(train=x), TypeError, "an ImageDataset or an \\(images, labels\\) pair")]
    for kw, error, message in bad:
        with pytest.raises(error, match=message):
            register_dataset(name, eps=0.1, **kw)
    assert DATASETS.get(name, None) is None  # nothing half-registered
    register_dataset(name, train=(x, y), eps=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(name, train=(x, y), eps=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("cifar10", train=(x, y), eps=0.1)
    assert get_dataset_info(name).default_eps == 0.1


def test_a_run_resumed_on_other_data_under_the_same_name_is_refused(tmp_path, name, mini):
    """Another process registers the name again: the run's recorded digest says whether it is the same data."""
    from sirobust.train import ResumeMismatch
    x, y, _, _ = mini
    register_dataset(name, train=(x, y), eps=0.1)
    cfg = TrainConfig(dataset=name, model="cnn-small", defense="standard", epochs=1, val_size=0, out=str(tmp_path),
                      progress=False)
    fit(cfg, log=lambda *_: None)
    recorded = sirobust.io.read_json(tmp_path / "config.json")["data_sha256"]
    assert recorded == get_dataset_info(name).data_sha256 and len(recorded) == 64
    del DATASETS[name]
    register_dataset(name, train=(x, (y + 1) % 10), eps=0.1)  # the same images, other labels
    more = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    with pytest.raises(ResumeMismatch, match=f"dataset '{name}' registered in this process holds other images"):
        fit(more, resume=True, log=lambda *_: None)
    del DATASETS[name]
    register_dataset(name, train=(x.float() / 255, y), eps=0.1)  # the same data, given as floats
    fit(more, resume=True, log=lambda *_: None)
    assert [r["epoch"] for r in sirobust.io.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_images_wider_than_high_train_with_augmentation_and_evaluate(tmp_path, name, mini):
    """Not square (28 x 20 crops of the bundled images): a zoo model (global pooling) and a model of the user's
    train with random crops and flips, and evaluate; the user model's check is given images of that shape."""
    from torch import nn
    x, y, xt, yt = mini
    info = register_dataset(name, train=(x[..., 4:24], y), test=(xt[..., 4:24], yt), eps=0.1, augment="crop-flip")
    assert info.image_shape == (1, 28, 20) and load_dataset(name, "train").images.shape[1:] == (1, 28, 20)
    fit(TrainConfig(dataset=name, model="cnn-small", defense="at", epochs=1, val_n=16, val_steps=1, attack_steps=1,
                    out=str(tmp_path / "zoo"), progress=False), log=lambda *_: None)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(28 * 20, 10))  # fails on any other shape
    fit(TrainConfig(dataset=name, defense="trades", si=True, epochs=1, val_size=0, attack_steps=1,
                    out=str(tmp_path / "own"), progress=False), model=flat, log=lambda *_: None)
    test = load_dataset(name, "test")
    report = sirobust.evaluate(sirobust.load(tmp_path / "zoo" / "model.safetensors"),
                               (test.float_images(), test.labels), attacks=["pgd", "si-pgd"], steps=2, progress=False)
    assert report.n == 48 and report.worst_case_acc <= report.clean_acc
