"""The training loop: learning, exact resume, kill-and-resume, divergence, bad configs."""
import json
import os

import pytest
import torch
from helpers import assert_same_weights, small_config

import sirobust
from sirobust.defenses.at import AT
from sirobust.io import read_json, read_jsonl
from sirobust.runfolder import RunFolderError
from sirobust.statefile import StateFileError
from sirobust.train import ResumeMismatch, TrainingDiverged, fit



small = small_config


def test_run_folder_has_metrics_weights_and_config(tmp_path):
    fit(small(tmp_path), log=lambda *_: None)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["val_clean_acc"] <= 1 and 0 <= r["val_robust_acc"] <= 1 and r["val_n"] == 64
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["eps"] == 0.1 and cfg["defense"]["attack"]["model_mode"] == "eval"
    # the weights depend on the processor and the thread count (a CPU's sums), so the run records both
    assert cfg["environment"]["threads"] == torch.get_num_threads() and cfg["environment"]["cpu"]
    prov = json.loads((tmp_path / "summary.json").read_text())["provenance"]
    assert prov["threads"] == torch.get_num_threads() and prov["cpu"] == cfg["environment"]["cpu"]
    assert len(cfg["val_indices"]) == 600  # the recorded validation split (10% of 6000)
    model = sirobust.load(tmp_path)
    assert model.sirobust_metadata["dataset"] == "fashion-mnist-mini"
    best = json.loads((tmp_path / "summary.json").read_text())["best"]
    assert best["metric"] == "val_robust_acc"
    assert best["val_robust_acc"] == max(r["val_robust_acc"] for r in rows)
    first_best = next(r["epoch"] for r in rows if r["val_robust_acc"] == best["val_robust_acc"])
    assert best["epoch"] == first_best  # ties keep the earlier epoch
    assert sirobust.load(tmp_path / "best.safetensors").sirobust_metadata["extra"].count(f'"epoch": {first_best}')


def test_holding_out_most_of_the_data_is_warned_of_and_the_usual_split_is_not(tmp_path):
    said = []
    fit(small(tmp_path / "odd", epochs=1, val_size=0.999, train_n=None), log=said.append)
    warned = [m for m in said if m.startswith("warning: val_size (--val-size) 0.999 holds out 5994 of 6000")]
    assert warned and "leaving 6 for training" in warned[0]
    said.clear()
    fit(small(tmp_path / "usual", epochs=1), log=said.append)
    assert not [m for m in said if "val_size" in m]


@pytest.mark.parametrize("defense,si", [("at", False), ("trades", True),
                                        pytest.param("he", False, marks=pytest.mark.slow)])  # he: 11 s
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, defense, si):
    # lr ÷10 after epoch 2 of 3: the resume must carry the scheduler too
    kw = dict(milestones=(2,), defense=defense, si=si)
    fit(small(tmp_path / "straight", epochs=3, **kw), log=lambda *_: None)
    fit(small(tmp_path / "split", epochs=1, **kw), log=lambda *_: None)
    fit(small(tmp_path / "split", epochs=3, **kw), resume=True, log=lambda *_: None)
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "split" / "model.safetensors")
    assert [r["epoch"] for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3]
    # the command that resumed a run is recorded for the resumed one only
    assert read_json(tmp_path / "straight" / "summary.json")["provenance"]["resumed_by"] is None
    assert read_json(tmp_path / "split" / "summary.json")["provenance"]["resumed_by"]


def test_resume_with_another_config_is_refused(tmp_path):
    fit(small(tmp_path, epochs=1, milestones=(5,)), log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="pass --milestones explicitly"):
        fit(small(tmp_path, epochs=20), resume=True, log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="differs in: .*lr"):
        fit(small(tmp_path, epochs=2, lr=0.2, milestones=(5,)), resume=True, log=lambda *_: None)
    with pytest.raises(ResumeMismatch, match="defense"):
        fit(small(tmp_path, epochs=2, defense="standard", milestones=(5,)), resume=True, log=lambda *_: None)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_without_a_run_and_a_malicious_state_file(tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        fit(small(tmp_path / "none"), resume=True, log=lambda *_: None)
    out = tmp_path / "evil"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (out / "train_state.pt").write_bytes(pickle.dumps({"x": Evil()}))  # a bare pickle
    with pytest.raises(StateFileError, match="train_state.pt is not a torch state file"):
        fit(small(out), resume=True, log=lambda *_: None)
    torch.save({"x": Evil()}, out / "train_state.pt")  # the same payload in torch's own container
    with pytest.raises(StateFileError, match="train_state.pt is not a readable sirobust state"):
        fit(small(out), resume=True, log=lambda *_: None)
    assert not marker.exists()


def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    fit(small(tmp_path, epochs=1, milestones=()), log=lambda *_: None)
    good_state = (tmp_path / "train_state.pt").read_bytes()
    good_best = (tmp_path / "best.safetensors").read_bytes()
    calls = {"n": 0}
    original = AT.__call__

    def poisoned(self, model, x, y, generator=None):
        loss, stats = original(self, model, x, y, generator)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(AT, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 3"):
        fit(small(tmp_path, epochs=2, milestones=()), resume=True, log=lambda *_: None)
    assert (tmp_path / "train_state.pt").read_bytes() == good_state
    assert (tmp_path / "best.safetensors").read_bytes() == good_best
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="cifar11"), "valid datasets"), (dict(model="resnet19"), "valid models"),
    (dict(defense="fgsm-at2"), "valid defenses"), (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"),
    (dict(eps=-0.1), "eps"), (dict(batch_size=0), "batch_size"), (dict(device="tpu"), "device"),
])
def test_bad_config_is_a_clear_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        fit(small(tmp_path, **kw), log=lambda *_: None)


def test_adversarial_training_is_far_more_robust_than_standard(tmp_path):
    kw = dict(epochs=2, train_n=2400, val_n=300, val_steps=10, attack_steps=5, batch_size=64)
    std = fit(small(tmp_path / "std", defense="standard", **kw), log=lambda *_: None)
    at = fit(small(tmp_path / "at", **kw), log=lambda *_: None)
    assert std["last"]["val_clean_acc"] > 0.7
    assert at["last"]["val_robust_acc"] > std["last"]["val_robust_acc"] + 0.25


def test_tensorboard_logging_when_asked(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'sirobust\[tensorboard\]'"):
            fit(small(tmp_path, epochs=1, tensorboard=True), log=lambda *_: None)
    else:
        fit(small(tmp_path, epochs=1, tensorboard=True), log=lambda *_: None)
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_compare_reuses_finished_runs_and_tabulates_every_defense(tmp_path):
    from sirobust.reproduce.compare import compare_defenses
    logs = []
    kw = dict(epochs=1, out=str(tmp_path), eval_n=30, steps=2, progress=False,
              train_kw=dict(train_n=128, val_n=32, attack_steps=1))
    res = compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append, **kw)
    assert [r["label"] for r in res["rows"]] == ["STANDARD", "TRADES", "TRADES-SI"]
    for r in res["rows"]:
        assert r["worst_case"] <= min(r[a] for a in ("pgd", "pgd-cw", "pgd-dlr", "si-pgd")) <= r["natural"]
    assert "| TRADES-SI |" in (tmp_path / "compare.md").read_text()
    assert "One training seed: no difference between a defense and its SI version is stated" in \
        (tmp_path / "compare.md").read_text()
    logs.clear()
    with pytest.raises(RunFolderError, match="already holds a compare run"):
        compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append, **kw)
    again = compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append,
                             mode="resume", **kw)
    # 3 runs and their 3 evaluations reused, nothing recomputed
    assert sum("[reuse]" in str(m) and "finished with the same configuration" in str(m) for m in logs) == 3
    assert sum("[reuse]" in str(m) and "eval-" in str(m) for m in logs) == 3
    assert [{k: r[k] for k in ("natural", "pgd", "worst_case")} for r in again["rows"]] == \
        [{k: r[k] for k in ("natural", "pgd", "worst_case")} for r in res["rows"]]
    with pytest.raises(RunFolderError, match=r"differs in: epochs"):
        compare_defenses("fashion-mnist-mini", "cnn-small", ["standard", "trades"], log=logs.append, mode="resume",
                         **{**kw, "epochs": 2})


def test_a_used_folder_is_refused_before_training_and_overwrite_moves_it_aside(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(small(run, epochs=1), log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    import sirobust.train as tr

    def must_not_run(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(tr, "load_dataset", must_not_run)
    with pytest.raises(RunFolderError, match="already holds a train run .*--resume.*--overwrite"):
        fit(small(run, epochs=3), log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    monkeypatch.undo()
    logs = []
    fit(small(run, epochs=1, seed=1), overwrite=True, log=logs.append)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and any(str(aside[0]) in m for m in logs)
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == before  # the old run, byte for byte
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 1


def test_fit_leaves_the_callers_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(small(tmp_path, epochs=1), log=lambda *_: None)
    assert torch.equal(torch.rand(3), expected)


def test_the_trainer_asks_the_defense_never_its_name():
    """What differs between defenses is an attribute or hook of the Defense (replays, inner_preset, own_start,
    prepare_model, ...): neither the trainer nor the cost estimate compares a defense's name."""
    import inspect
    import re

    import sirobust.reproduce.cost as cost
    from sirobust import schedule, train, train_config, train_eval, train_files, train_state
    for module in (train, train_config, train_state, train_eval, train_files, schedule, cost):
        found = re.findall(r"defense\s*(?:==|!=|in\s)|(?:==|!=)\s*[\"'](?:standard|he|free|gat)[\"']",
                           inspect.getsource(module))
        assert not found, f"{module.__name__} tests a defense's name: {found}"


def test_defense_hooks_say_what_the_trainer_used_to_test_by_name():
    from sirobust.defenses import build_defense
    from sirobust.models import build_model
    model = build_model("cnn-small", num_classes=10, in_channels=1)
    build_defense("at").prepare_model(model)
    assert model.head_type == "linear"
    he = build_defense("he", scale=10.0)
    he.prepare_model(model)  # HE trains, validates and saves its s · cos θ head
    assert model.head_type == "cosine" and model.head.scale == 10.0 and he.leaves_parameters_unused
    assert not build_defense("standard").uses_attack and build_defense("trades").uses_attack
    assert build_defense("free").own_start and build_defense("gat").own_start and not build_defense("at").own_start
    assert build_defense("free", m=4).replays == 4 and build_defense("free").attack_reuses_training_backward


def test_cost_estimate_of_each_defense_is_unchanged():
    """The estimate asks the defense for its replays and whether its attack has passes of its own."""
    from sirobust.reproduce.cost import train_flops
    from sirobust.train import TrainConfig

    def flops(defense, **kw):
        return train_flops(TrainConfig(defense=defense, epochs=2, train_n=1000, val_size=0, **kw).resolved())
    def expected(per_image):  # epochs × images × forward-equivalents per image × cnn-small's FLOPs per forward
        return 2 * (1000 * per_image) * 6.08e6
    assert flops("standard") == expected(3)
    assert flops("at", attack_steps=10) == expected(30 + 3)
    assert flops("trades", attack_steps=10) == expected(30 + 7)
    assert flops("free", defense_params={"m": 4}) == expected(3 * 4)  # FreeAT's attack rides on the update
    assert flops("fgsm-rs") == expected(3 + 3)


def test_a_signal_in_a_runs_last_epoch_stops_compare_before_the_next_run(tmp_path, monkeypatch):
    """The run finishes (its last epoch is the whole job), and the request is not lost: compare stops there."""
    import os
    import signal

    import sirobust.train as trainer
    from sirobust.interrupts import RunInterrupted
    from sirobust.reproduce.compare import compare_defenses
    real, calls = trainer._train_epoch, []

    def epoch_then_signal(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == 1:  # after the first run's last batch: the epoch loop has nothing left to check
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "_train_epoch", epoch_then_signal)
    kw = dict(epochs=1, out=str(tmp_path), eval_n=16, steps=1, progress=False,
              train_kw=dict(train_n=64, val_n=16, attack_steps=1))
    with pytest.raises(RunInterrupted, match="stopped by a signal during the comparison") as stopped:
        compare_defenses("fashion-mnist-mini", "cnn-small", ["at"], si_modes=(False, True), log=lambda *_: None, **kw)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert len(calls) == 1 and (tmp_path / "at" / "summary.json").exists()  # the first run is whole
    assert not (tmp_path / "at-si" / "summary.json").exists()  # the second never started


@pytest.mark.parametrize("kw,message", [
    (dict(defense="standard", si=True), "--with-si needs an adversarial defense .*fgsm-rs, free, gat, gradalign"),
    (dict(defense="free", attack_steps=3), r"attack_steps \(--steps\) does not apply to free"),
])
def test_a_setting_the_defense_cannot_take_is_refused_before_the_run_folder_exists(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        fit(small(tmp_path / "run", **kw), log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # the corrected command can take the same --out


def test_the_overfitting_checks_subset_size_has_its_flag():
    from sirobust.cli import build_parser, train_config_from_args
    args = build_parser().parse_args(["train", "--defense", "fgsm-rs", "--overfit-n", "64"])
    assert train_config_from_args(args).overfit_n == 64


def test_compare_over_seeds_trains_each_run_per_seed_and_tests_across_them(tmp_path):
    from sirobust.reproduce.compare import compare_defenses
    kw = dict(epochs=1, out=str(tmp_path), eval_n=24, steps=1, progress=False,
              train_kw=dict(train_n=64, val_n=16, attack_steps=1))
    res = compare_defenses("fashion-mnist-mini", "cnn-small", ["at"], seeds=[0, 1], log=lambda *_: None, **kw)
    assert [r["label"] for r in res["rows"]] == ["AT", "AT-SI"]
    for r in res["rows"]:
        assert r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
        runs = [p["run"] for p in r["per_seed"]]
        assert [p.rsplit("-", 1)[1] for p in runs] == ["seed0", "seed1"]
        naturals = [read_json(p["report"])["clean_acc"] for p in r["per_seed"]]
        assert r["natural"] == pytest.approx(sum(naturals) / 2)  # the cell is the mean over the seeds
        assert read_json(f"{runs[1]}/config.json")["config"]["seed"] == 1
    md = (tmp_path / "compare.md").read_text()
    assert "±" in md and "seed" in md and "One training seed" not in md


def test_compare_passes_its_training_and_validation_flags_to_every_run(tmp_path):
    from sirobust.cli import main
    assert main(["compare", "--defenses", "at", "--with-si", "off", "--epochs", "1", "--train-n", "64", "-n", "16",
                 "--steps", "1", "--train-steps", "1", "--val-n", "16", "--val-steps", "1", "--batch-size", "32",
                 "--val-size", "0.25", "--no-progress", "--out", str(tmp_path)]) == 0
    config = read_json(tmp_path / "at" / "config.json")["config"]
    assert (config["attack_steps"], config["val_n"], config["val_steps"], config["batch_size"], config["val_size"]) == \
        (1, 16, 1, 32, 0.25)
