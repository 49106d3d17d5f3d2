"""``sirobust rescale``: the logit-rescaling study of the paper's Fig. 1."""
from __future__ import annotations

from .args import add_output_args, output_path, parse_list, parse_numbers, run_mode
from .evaluate import add_model_args, load_model_and_data

DEFAULT_OUT = "runs/rescale"


def cmd_rescale(a) -> int:
    from ..experiments import rescale
    from ..runfolder import RunFolder
    out = output_path(a, DEFAULT_OUT)
    alphas = a.alphas if a.alphas else rescale.log_grid(a.alpha_min, a.alpha_max, a.points)
    with RunFolder(out, "rescale", run_mode(a), config={"command": "rescale"}) as folder:
        model, ds, idx, eps, device, path = load_model_and_data(a)
        result = rescale.rescale_study(model, ds, alphas, attacks=parse_list(a.attacks), eps=eps, steps=a.steps,
                                       alpha=a.alpha, restarts=a.restarts, norm=a.norm, n=a.n,
                                       batch_size=a.batch_size, seed=a.seed, device=device,
                                       progress=not a.no_progress,
                                       config={"weights": path, "dataset": ds.name, "split": a.split})
        print(rescale.format_table(result))
        rescale.save(result, folder.path / "rescale.json", folder.path / "rescale.png")
    print(f"results: {out / 'rescale.json'}, plot: {out / 'rescale.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("rescale", help="the logit-rescaling study (paper Fig. 1): accuracy of α·model vs α")
    add_model_args(p)
    p.add_argument("--attacks", default="pgd,si-pgd", help="comma-separated attack names (default pgd,si-pgd)")
    p.add_argument("--alphas", type=parse_numbers, default=None, help="comma-separated logit scales α (default: log grid)")
    p.add_argument("--alpha-min", type=float, default=1e-3, help="smallest α of the grid (default 1e-3)")
    p.add_argument("--alpha-max", type=float, default=1e3, help="largest α of the grid (default 1e3)")
    p.add_argument("--points", type=int, default=7, help="α values in the grid (default 7)")
    add_output_args(p, DEFAULT_OUT, "results folder (rescale.json, rescale.png)")
    p.set_defaults(func=cmd_rescale)
