"""``sirobust rescale``: the logit-rescaling study of the paper's Fig. 1."""
from __future__ import annotations

from .args import add_output_args, float_arg, int_arg, output_path, parse_numbers, run_mode
from .evaluate import attack_settings, attacks_arg
from .models import add_model_args, load_data, load_model, resolve_source, threat_settings

DEFAULT_OUT = "runs/rescale"


def cmd_rescale(a) -> int:
    from ..experiments import rescale
    from ..io import check_output_dir
    from ..runfolder import RunFolder
    from ..device import pick_device
    out = output_path(a, DEFAULT_OUT)
    alphas = a.alphas if a.alphas else rescale.log_grid(a.alpha_min, a.alpha_max, a.points)
    if any(not v > 0 for v in alphas):
        raise ValueError(f"--alphas must all be > 0 (they multiply the logits), got {alphas}")
    check_output_dir(out, "the rescale results", create=False)  # before anything else, and creating nothing
    source = resolve_source(a)  # cheap checks next: a bad flag must not move an earlier run aside
    eps, norm = threat_settings(a, source)
    device = pick_device(a.device)
    with RunFolder(out, "rescale", run_mode(a), config={"alphas": alphas}) as folder:
        model, prov = load_model(a, source, device)
        ds, _ = load_data(a, source)
        result = rescale.rescale_study(model, ds, alphas, attacks=a.attacks, device=device, progress=not a.no_progress,
                                       config={"dataset": ds.name, "split": a.split}, provenance=prov, log=print,
                                       **attack_settings(a, eps, norm, model))
        print(rescale.format_table(result))
        rescale.save(result, folder.path / "rescale.json", folder.path / "rescale.png")
    print(f"results: {out / 'rescale.json'}, plot: {out / 'rescale.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("rescale", help="the logit-rescaling study (paper Fig. 1): accuracy of α·model vs α")
    add_model_args(p)
    p.add_argument("--attacks", type=attacks_arg(), default=["pgd", "si-pgd"],
                   help="comma-separated attack names (default pgd,si-pgd)")
    p.add_argument("--alphas", type=parse_numbers, default=None,
                   help="comma-separated logit scales α (default: a log grid from --alpha-min to --alpha-max)")
    p.add_argument("--alpha-min", type=float_arg("--alpha-min", min=0, min_open=True), default=1e-3,
                   help="smallest logit scale of the grid (default 1e-3)")
    p.add_argument("--alpha-max", type=float_arg("--alpha-max", min=0, min_open=True), default=1e3,
                   help="largest logit scale of the grid (default 1e3)")
    p.add_argument("--points", type=int_arg("--points", min=2), default=7, help="logit scales in the grid (default 7)")
    add_output_args(p, DEFAULT_OUT, "results folder (rescale.json, rescale.png)")
    p.set_defaults(func=cmd_rescale)
