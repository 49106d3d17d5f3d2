"""``sirobust evaluate``: robust accuracy of one model under a list of attacks, as a report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .args import add_speed_args, names_arg, parse_param
from .models import add_model_args, load_data, load_model, resolve_source, threat_settings

DEFAULT_REPORT = "report.json"
DEFAULT_ATTACKS = "pgd,pgd-cw,pgd-dlr,si-pgd"


def attacks_arg():
    from ..attacks import canonical_attack_name, list_attacks
    return names_arg("attack", canonical_attack_name, list_attacks)


def refuse_a_run_folders_own_file(out: Path) -> None:
    """A report may go into a run folder, but never over the files of the run that lives there (its record, its
    configuration, its summary, their Markdown twins): --overwrite replaces reports, and a report written over
    run.json would leave a run that can no longer be resumed or reused."""
    from ..runfolder import RUN_FILE
    from ..train_files import CONFIG_NAME, METRICS_NAME, SUMMARY_NAME
    own = {Path(name).stem.lower() for name in (RUN_FILE, CONFIG_NAME, SUMMARY_NAME, METRICS_NAME)}
    if (out.parent / RUN_FILE).is_file() and out.stem.lower() in own:  # lower: case-insensitive file systems
        raise ValueError(f"--out: {out.name} in {out.parent} is a file of the run there, not a report; write the "
                         f"report under another name, e.g. {out.parent / 'report.json'}")


def report_path(a) -> Path:
    """Where the report goes, checked before any work: an existing report is replaced only with --overwrite."""
    from ..io import check_output_file
    from ..runfolder import fresh_name
    if a.out is None and a.resume:
        out = Path(DEFAULT_REPORT)
    elif a.out is None:
        out = fresh_name(DEFAULT_REPORT, companions=(".md", ".evaluation"))
    else:
        out = Path(a.out or DEFAULT_REPORT)
        if out.is_dir():
            check_output_file(out, "the report")  # "it is a folder": one message for every command
        if out.suffix != ".json":
            raise ValueError(f"--out must name a .json file (the Markdown table goes beside it), got {out}")
        taken = [p for p in (out, out.with_suffix(".md")) if p.exists()]
        if out.exists() and a.resume:
            raise ValueError(f"--resume: {out} exists, so that evaluation finished; nothing to resume")
        if a.resume:  # a .md without its .json: a save that was interrupted, redone now
            taken = []
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
    params = attack_params(a)
    if a.head:
        from torch import nn

        from ..attacks.registry import attack_parameters
        from ..foreign import Normalized
        # --mean/--std put the user's model inside a wrapper: its layer names gain the "model." prefix, which
        # an error about the name must not show (the user named the layer of their own model)
        head = a.head
        if isinstance(model, Normalized) and not a.head.startswith("model."):
            layers = dict(model.model.named_modules())
            if not isinstance(layers.get(a.head), nn.Linear):
                linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
                what = "no layer named" if a.head not in layers else f"a {type(layers[a.head]).__name__}, not a " \
                    "linear layer:"
                raise ValueError(f"--head: {what} {a.head!r} in the model; its linear layers: "
                                 f"{', '.join(linears) or 'none'}")
            head = f"model.{a.head}"
        for name in a.attacks:  # the attacks that read features (black-box ones take no head)
            if attack_parameters(name) is None or "head" in attack_parameters(name):
                params[name] = {"head": head, **params.get(name, {})}
    if params:
        settings["attack_params"] = params
    return settings


def attack_params(a) -> dict:
    """--attack-param spsa.samples=256 ... as {"spsa": {"samples": 256}}, each naming one of --attacks."""
    from ..attacks import canonical_attack_name
    from ..attacks.registry import ATTACKS
    from ..attacks.stages import check_overrides
    out: dict = {}
    for key, value in getattr(a, "attack_param", None) or []:  # `rescale` has no --attack-param
        attack, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"--attack-param must be ATTACK.KEY=VALUE (e.g. spsa.samples=256), got {key}={value}")
        attack = canonical_attack_name(attack)
        if attack not in a.attacks:
            raise ValueError(f"--attack-param {key}: {attack} is not among --attacks ({', '.join(a.attacks)})")
        if name in ("eps", "norm"):  # one attack at another ε would measure another threat model than reported
            raise ValueError(f"--attack-param {key}: ε and the norm belong to the whole evaluation; use --eps, --norm")
        out.setdefault(attack, {})[name] = value
    for attack, params in out.items():  # the names, before anything is loaded (the values when it is built)
        check_overrides(ATTACKS, attack, params)
    return out


def finish_interrupted_save(a) -> Optional[str]:
    """--resume of an evaluation whose report was saved but not finished (killed after its JSON, before its
    Markdown or the removal of its progress folder, as a sirobust before 0.1 could be): the Markdown is written
    from the JSON and the folder removed. None when there is nothing of the kind."""
    import shutil

    from ..io import atomic_write_text
    from ..report import Report
    out = Path(a.out or DEFAULT_REPORT)
    state, md = progress_folder(out), out.with_suffix(".md")
    if not out.is_file() or (md.exists() and not state.exists()):
        return None
    report = Report.load(out)  # a damaged JSON is an error naming it, as everywhere
    if not md.exists():
        atomic_write_text(md, report.to_markdown())
    shutil.rmtree(state, ignore_errors=True)
    return f"the evaluation in {out} had finished; its save was interrupted and is now complete: {out} and {md}"


def progress_folder(report: Path) -> Path:
    """Where an evaluation keeps its finished batches until its report is written: r.json -> r.evaluation."""
    return report.with_suffix(".evaluation")


def signature(a, source, eps: float, norm: str, model, prov: dict, device=None) -> dict:
    """Everything that decides an evaluation's results: --resume continues only the same evaluation."""
    from ..provenance import weights_identity
    weights = prov.get("weights_sha256") or weights_identity(model)["weights_sha256"]
    sig = {"weights_sha256": weights, "model": prov.get("model") or str(source.path), "dataset": source.dataset,
            "split": a.split, "n": a.n, "eps": eps, "norm": norm, "steps": a.steps, "step_size": a.step_size,
            "restarts": a.restarts, "seed": a.seed, "batch_size": a.batch_size, "attacks": list(a.attacks),
            "head": a.head, "mean": a.mean, "std": a.std}
    if attack_params(a):  # absent when none, so evaluations started before the flag existed still resume
        sig["attack_params"] = attack_params(a)
    from ..fastpath import resolve_precision
    precision = resolve_precision(getattr(a, "precision", "fp32"), device or "cpu").precision
    if precision != "fp32":  # as resolved on this device; absent for fp32, what evaluations before it ran
        sig["precision"] = precision
    return sig


def cmd_evaluate(a) -> int:
    import contextlib
    import shutil

    from ..distributed import current
    from ..evaluate import evaluate
    from ..interrupts import RunInterrupted, graceful_stop
    from ..progress import EvaluationProgress
    from ..runfolder import ConfigMismatch, RunFolder, command_line, config_difference
    group = current(a.device)  # torchrun: join the other processes (rank 0 writes, every rank attacks)
    say = print if group.main else (lambda *_, **__: None)
    if a.out:  # before anything else, --resume's reading of it as a report included
        refuse_a_run_folders_own_file(Path(a.out))
    repaired = group.first(finish_interrupted_save, a) if a.resume else None
    if repaired:
        say(repaired)
        return 0
    out = group.first(report_path, a)
    attack_params(a)  # checked before anything is loaded
    source = resolve_source(a)
    eps, norm = threat_settings(a, source)
    device = group.device(a.device)
    model, prov = load_model(a, source, device)
    ds, idx = group.local_first(load_data, a, source)  # a download happens once per node
    sig = signature(a, source, eps, norm, model, prov, device)
    mode = "resume" if a.resume else "overwrite" if a.overwrite else "new"
    state = progress_folder(out)

    def claim(stack):
        folder = stack.enter_context(RunFolder(state, "evaluate", mode, config=sig, what="evaluation"))
        if folder.resumed:
            diff = config_difference(folder.record.get("config") or {}, sig)
            if diff:
                raise ConfigMismatch(f"--resume: the evaluation in {state} was started with other settings "
                                     f"(differs in: {', '.join(diff)}); use the same flags, or --overwrite")
            print(f"resuming the evaluation in {state}")
        return folder

    with contextlib.ExitStack() as stack:
        folder = group.first(claim, stack, share=False)  # rank 0 owns the folder; a refusal stops every rank
        stop = stack.enter_context(graceful_stop())
        say(f"evaluating {prov.get('model') or source.path} on {ds.name} ({a.split}), {norm} ε = {eps:.6g}: "
            f"{', '.join(a.attacks)}" + (f" ({group.world} processes)" if group.enabled else ""))
        try:
            report = evaluate(model, ds, attacks=a.attacks, device=device, progress=not a.no_progress,
                              indices=None if idx is None else idx.tolist(), log=say,
                              config={"dataset": ds.name, "split": a.split}, provenance={"split": a.split, **prov},
                              saved=EvaluationProgress(folder.path) if folder is not None else None, stop=stop,
                              precision=a.precision, compile=a.compile, group=group,
                              **attack_settings(a, eps, norm, model))
        except RunInterrupted as e:
            again = command_line().replace(" --overwrite", "")
            raise RunInterrupted(f"{e}; continue with: {again}{'' if a.resume else ' --resume'}", e.signum) from None
        if group.main:
            print(report.table())  # with a line for each sanity flag that fired
            report.save(out)
    if group.main:
        shutil.rmtree(state, ignore_errors=True)  # the report now holds every result the folder kept
        print(f"report: {out} and {out.with_suffix('.md')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="clean and robust accuracy under attacks, worst case, JSON + Markdown report",
                       description="Attack one model with each attack, report per-attack and worst-case robust "
                                   "accuracy with 95 % intervals, sanity flags and provenance.")
    add_model_args(p)
    p.add_argument("--attacks", type=attacks_arg(), default=DEFAULT_ATTACKS.split(","),
                   help=f"comma-separated attack names (default {DEFAULT_ATTACKS}; `sirobust list` shows all)")
    p.add_argument("--attack-param", type=parse_param, action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="an attack's own setting, repeatable: spsa.samples=256, rays.queries=40000, square.queries=1000 "
                        "(an unknown key is refused with the attack's list)")
    p.add_argument("--out", default=None, help=f"report file (default {DEFAULT_REPORT}; when that exists, the first "
                                               "free report-2.json, report-3.json, ...); a .md table goes beside it, "
                                               "and finished batches are kept in REPORT.evaluation/ until it is written")
    add_speed_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace the report --out names if it exists")
    group.add_argument("--resume", action="store_true",
                       help="continue a stopped evaluation of --out, redoing none of its finished batches")
    p.set_defaults(func=cmd_evaluate)
