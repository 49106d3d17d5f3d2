"""Fingerprints of sirobust's behaviour: run before and after a refactor, the two JSONs must be equal.

What it records, on the tests' small models (cnn-small on the bundled Fashion-MNIST subset, CPU):
- every registered attack's ``x_adv`` (sha256 of its bytes) with a cheap budget, under L∞ and, where the
  attack supports it, L2;
- ``evaluate()``'s per-example outcomes and ``broken_by`` for the default attacks;
- every defense ± SI: the weights after one short epoch of training (sha256 of the tensors, in key order)
  and the run folder's key.

Usage: python scripts/fingerprint.py OUT.json ; then diff two such files (``--compare A B``).
Behaviour-preserving changes (issue 20) must leave every entry equal, bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_model(tmp: Path):
    from helpers import small_config
    from sirobust.checkpoint import load
    from sirobust.train import fit
    fit(small_config(tmp / "base", epochs=2, device="cpu"))
    return load(tmp / "base" / "model.safetensors", device="cpu").eval()


def attack_prints(model, x, y) -> dict:
    from helpers import cheap_attack
    from sirobust.attacks import list_attacks
    out = {}
    for name in list_attacks():
        for norm, eps in (("Linf", 0.1), ("L2", 1.5)):
            torch.manual_seed(0)
            try:
                atk = cheap_attack(name, model, eps=eps, norm=norm)
                x_adv = atk(x, y)
            except (ValueError, NotImplementedError, TypeError) as e:
                out[f"{name}/{norm}"] = f"refused: {type(e).__name__}"
                continue
            out[f"{name}/{norm}"] = _digest(x_adv)
    return out


def evaluate_prints(model, x, y) -> dict:
    from sirobust.evaluate import evaluate
    rep = evaluate(model, (x, y), eps=0.1, steps=5, progress=False, device="cpu", precision="fp32")
    d = rep.to_dict()
    keep = {k: d[k] for k in ("clean_correct", "worst_case_robust", "broken_by", "max_perturbation")}
    for name, res in d["attacks"].items():   # timings vary between runs; everything else must not
        keep[f"attack:{name}"] = {k: v for k, v in res.items() if "time" not in k and "second" not in k}
    return json.loads(json.dumps(keep, sort_keys=True, default=str))


def defense_prints(tmp: Path) -> dict:
    from helpers import small_config
    from sirobust.defenses import list_defenses
    from sirobust.train import fit
    from sirobust.checkpoint import load
    out = {}
    for name in list_defenses():
        for si in (False, True):
            if si and name in ("standard", "he"):
                continue
            folder = tmp / f"{name}-{si}"
            try:
                fit(small_config(folder, defense=name, si=si, epochs=1, train_n=128, val_n=32, device="cpu"),
                    log=lambda *a, **k: None)
            except ValueError as e:
                out[f"{name}/si={si}"] = f"refused: {e}"[:80]
                continue
            model = load(folder / "model.safetensors", device="cpu")
            out[f"{name}/si={si}"] = _weights_digest(model)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="where to write the JSON")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    a = p.parse_args(argv)
    if a.compare:
        A, B = (json.loads(Path(f).read_text()) for f in a.compare)
        diffs = [f"{sec}/{k}" for sec in sorted(set(A) | set(B))
                 for k in sorted(set(A.get(sec, {})) | set(B.get(sec, {})))
                 if A.get(sec, {}).get(k) != B.get(sec, {}).get(k)]
        print("identical" if not diffs else "DIFFERENT:\n  " + "\n  ".join(diffs))
        return 1 if diffs else 0
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = trained_model(tmp)
        from sirobust.data import load_dataset
        ds = load_dataset("fashion-mnist-mini", "test")
        part = ds.subset(range(24))
        x, y = part.float_images(), part.labels.long()
        result = {"attacks": attack_prints(model, x, y), "evaluate": evaluate_prints(model, x, y),
                  "defenses": defense_prints(tmp)}
    text = json.dumps(result, indent=1, sort_keys=True)
    if a.out:
        Path(a.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
