"""``sirobust evaluate``: robust accuracy of one model under a list of attacks, as a report."""
from __future__ import annotations

from pathlib import Path

from .args import names_arg
from .models import add_model_args, load_data, load_model, resolve_source, threat_settings

DEFAULT_REPORT = "report.json"
DEFAULT_ATTACKS = "pgd,pgd-cw,pgd-dlr,si-pgd"


def attacks_arg():
    from ..attacks import canonical_attack_name, list_attacks
    return names_arg("attack", canonical_attack_name, list_attacks)


def report_path(a) -> Path:
    """Where the report goes, checked before any work: an existing report is replaced only with --overwrite."""
    from ..io import check_output_file
    from ..runfolder import fresh_name
    if a.out is None:
        out = fresh_name(DEFAULT_REPORT, companions=(".md",))
    else:
        out = Path(a.out)
        if out.is_dir():
            check_output_file(out, "the report")  # "it is a folder": one message for every command
        if out.suffix != ".json":
            raise ValueError(f"--out must name a .json file (the Markdown table goes beside it), got {out}")
        taken = [p for p in (out, out.with_suffix(".md")) if p.exists()]
        if taken and not a.overwrite:
            raise ValueError(f"--out: {taken[0]} already exists; pass --overwrite to replace the report, or choose "
                             "another name")
    check_output_file(out, "the report", create=False)  # folders are made when the report is written
    check_output_file(out.with_suffix(".md"), "the report", create=False)
    return out


def attack_settings(a, eps: float, norm: str, model=None) -> dict:
    """The keyword arguments of sirobust.evaluate that come from the threat-model flags."""
    settings = dict(eps=eps, norm=norm, steps=a.steps, alpha=a.step_size, restarts=a.restarts, n=a.n,
                    batch_size=a.batch_size, seed=a.seed, force_step_size=bool(a.force_step_size))
    if a.head:
        from ..attacks import ATTACKS
        from ..foreign import Normalized
        # --mean/--std put the user's model inside a wrapper: its layer names gain the "model." prefix
        head = f"model.{a.head}" if isinstance(model, Normalized) and not a.head.startswith("model.") else a.head
        settings["attack_params"] = {name: {"head": head} for name in ATTACKS}
    return settings


def cmd_evaluate(a) -> int:
    from ..evaluate import evaluate
    from ..train import pick_device
    out = report_path(a)
    source = resolve_source(a)
    eps, norm = threat_settings(a, source)
    device = pick_device(a.device)
    model, prov = load_model(a, source, device)
    ds, idx = load_data(a, source)
    print(f"evaluating {prov.get('model') or source.path} on {ds.name} ({a.split}), {norm} ε = {eps:.6g}: "
          f"{', '.join(a.attacks)}")
    report = evaluate(model, ds, attacks=a.attacks, device=device, progress=not a.no_progress,
                      indices=None if idx is None else idx.tolist(), log=print,
                      config={"dataset": ds.name, "split": a.split}, provenance={"split": a.split, **prov},
                      **attack_settings(a, eps, norm, model))
    print(report.table())
    for f in report.flags:
        if f["triggered"]:
            print(f"warning [{f['name']}]: {f['message']}")
    report.save(out)
    print(f"report: {out} and {out.with_suffix('.md')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="clean and robust accuracy under attacks, worst case, JSON + Markdown report",
                       description="Attack one model with each attack, report per-attack and worst-case robust "
                                   "accuracy with 95 % intervals, sanity flags and provenance.")
    add_model_args(p)
    p.add_argument("--attacks", type=attacks_arg(), default=DEFAULT_ATTACKS.split(","),
                   help=f"comma-separated attack names (default {DEFAULT_ATTACKS}; `sirobust list` shows all)")
    p.add_argument("--out", default=None, help=f"report file (default {DEFAULT_REPORT}; when that exists, the first "
                                               "free report-2.json, report-3.json, ...); a .md table goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace the report --out names if it exists")
    p.set_defaults(func=cmd_evaluate)
