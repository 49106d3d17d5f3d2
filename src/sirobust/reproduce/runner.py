"""Running a plan: train (or reuse) each run, evaluate (or reuse) each cell, then write the table or figure.

Everything is kept under one output root (``--out``, a run folder of kind "reproduce"):

    OUT/runs/<dataset>/<model>/<defense>-e<epochs>-<hash>/   a training run (sirobust train's folder)
        reproduce/eval-<hash>.json                           one evaluation of it (report + what was asked)
        reproduce/eval-<hash>-b<batch>.partial/              its finished batches while it runs (then removed)
    OUT/published/<name>/eval-<hash>.json                    evaluations of a published model
    OUT/<experiment>-<preset>/                               the table (md, csv, tex, json) or figure (png, pdf, json)
    OUT/<experiment>-<preset>+<hash>/                        the same, made with command-line overrides

A finished run is reused when its summary matches the resolved config; a stopped one is resumed.
An evaluation is reused when its file exists for the same weights (sha256), view, ε, attacks with all
their parameters, arithmetic and EVAL_VERSION; a stopped one continues from its saved batches.
So a grid that was interrupted continues where it stopped, and tables that share runs share them.

Several processes may work on one ``OUT`` at once (``--shard K/N``, ``--jobs N``): each run and each
evaluation is claimed by a lock of its own (``OUT/.locks/``) before it is computed, and looked at again once
claimed, so none is computed twice; a process that finds one claimed by another goes on with the rest,
and the table is written by the process that finds every evaluation done (or by ``--collect``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from .._version import __version__
from ..interrupts import RunInterrupted, graceful_stop, take_pending_stop
from ..io import file_sha256, read_json, write_json
from ..provenance import environment_info
from ..runfolder import RUN_FILE, RunFolder, command_line
from .plan import Cell, EvalJob, Plan, digest, resolved_dict, run_name, runs_root

KIND = "reproduce"
# Part of every evaluation's and figure's key, beside each attack's full parameters: results computed by
# another version of sirobust's attacks are not reused. Raise the number with any change that moves a number
# without changing a parameter (an attack's algorithm, the evaluator's verdicts, a figure's computation).
EVAL_VERSION = f"sirobust {__version__}, reproduce 1"


def open_root(out, overwrite: bool = False, log: Callable = print) -> RunFolder:
    """The output root, claimed for this process: reused when it holds earlier results (that is the point:
    they are skipped), moved aside with ``overwrite``."""
    out = Path(out)
    holds = (out / RUN_FILE).is_file()
    mode = "overwrite" if overwrite else ("resume" if holds else "new")
    return RunFolder(out, KIND, mode, config={"root": "sirobust reproduce results"}, log=log,
                     what="reproduction folder")


def prepare_root(out, log: Callable = print, wait: float = 60.0) -> Path:
    """The output root made ready (created, or checked to be a reproduction folder) for a process that works
    beside others (a shard, a job): claimed only while it is checked, since every run and evaluation has a
    lock of its own. A process that holds the root for its whole life (a plain ``sirobust reproduce``) is
    waited for ``wait`` seconds, then named."""
    from ..runfolder import FolderBusy
    deadline = time.monotonic() + wait
    while True:
        try:
            with open_root(out, log=log) as root:
                return root.path
        except FolderBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class UnitLock:
    """A claim on one unit of work under ``OUT/.locks/`` (a run to train, an evaluation to compute), so that
    processes sharing ``OUT`` never compute the same one twice; ``held`` is False when another has it."""

    def __init__(self, root: Path, key: str):
        from ..runfolder import FolderLock
        folder = Path(root) / ".locks" / digest(key, 16)
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(folder)
        self.held = False

    def __enter__(self) -> "UnitLock":
        from ..runfolder import FolderBusy
        try:
            self.lock.acquire(log=_no_log, what="work unit")
            self.held = True
        except FolderBusy:
            self.held = False
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.lock.release()


def _no_log(*_a, **_k) -> None:
    pass


class _GroupClaim:
    """A :class:`UnitLock` held by rank 0 of a torchrun group on behalf of every rank."""

    def __init__(self, runner, key: str):
        self.group = runner.group
        self.lock = UnitLock(runner.out, key) if self.group.main else None
        self.held = False

    def __enter__(self) -> "_GroupClaim":
        held = self.lock.__enter__().held if self.lock is not None else None
        self.held = bool(self.group.broadcast(held))
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.__exit__(*exc)


def run_state(cfg) -> str:
    """"finished" (with this configuration), "started" (a run to resume) or "none"."""
    from ..train import STATE_NAME, recorded_config
    out = Path(cfg.out)
    summary = out / "summary.json"  # written only when a run completes
    if summary.exists():
        done = read_json(summary)
        if done.get("identity") == json.loads(json.dumps(cfg.identity())) and done.get("epochs") == cfg.epochs:
            return "finished"
    return "started" if recorded_config(out) is not None or (out / STATE_NAME).exists() else "none"


def train_or_reuse(cfg, log: Callable = print, protocol: Optional[dict] = None, group=None) -> bool:
    """Reuse a finished run with the same configuration, resume a stopped one, or train a new one; True when
    it was reused. Under torchrun, rank 0 decides and every process trains."""
    from ..distributed import current
    from ..train import fit
    group = group or current(cfg.device)
    state = group.first(run_state, cfg)
    if state == "finished":
        log(f"[reuse] {cfg.out} (finished with the same configuration)")
    else:
        fit(cfg, resume=state == "started", log=log)  # a run with another configuration is refused by name
    if protocol is not None and group.main:
        record_use(Path(cfg.out) / "protocol.json", protocol, trained=state != "finished")
    return state == "finished"


def record_use(path: Path, protocol: dict, trained: bool) -> None:
    """protocol.json of a run: the experiment and preset that trained it (with its protocol), and every one
    that has used it since (a run is shared between tables)."""
    record = read_json(path) if path.exists() else {}
    if "experiment" in record:  # written before runs were shared on record: it names the one that trained it
        record = {"trained_by": {k: record.pop(k) for k in ("experiment", "preset", "protocol") if k in record},
                  **record}
    if trained:
        record["trained_by"] = protocol
    elif "trained_by" not in record:  # trained before runs kept this record, or by `sirobust train`
        record["trained_by"] = {"experiment": "unknown"}
    user = {"experiment": protocol["experiment"], "preset": protocol["preset"]}
    used = [u for u in record.get("used_by", []) if u != user]
    record["used_by"] = used + [user]
    write_json(path, record)


def saved_result(path: Path, spec: dict) -> Optional[dict]:
    """The evaluation stored at ``path`` if it was computed for ``spec``, else None."""
    if not path.exists():
        return None
    saved = read_json(path)
    return saved if saved.get("spec") == json.loads(json.dumps(spec)) else None


def weights_of(cfg, which: str) -> Path:
    from ..checkpoint import BEST_NAME, WEIGHTS_NAME
    path = Path(cfg.out) / (BEST_NAME if which == "best" else WEIGHTS_NAME)
    if which == "best" and not path.exists():
        raise FileNotFoundError(f"{cfg.out} has no best checkpoint (trained without a validation split?); "
                                "evaluate the last epoch's weights (eval.which = \"last\")")
    return path


class Runner:
    """Computes a plan's cells into ``out``; see the module docstring."""

    def __init__(self, plan: Plan, out, device: str = "auto", progress: bool = True, log: Callable = print,
                 run_dirs: Optional[dict] = None, group=None, units: Optional[set] = None, claims: bool = True,
                 prefer: Optional[set] = None):
        from ..distributed import current
        self.plan, self.out, self.device, self.progress, self.log = plan, Path(out), device, progress, log
        self.run_dirs = run_dirs or {}  # run name -> folder, where a caller keeps its own layout (compare, demo)
        self.group = group or current(device)  # under torchrun: rank 0 decides what is reused and writes
        self.units = units  # the runs and published models this process computes (a shard's); None: all
        # a job of --jobs: its own shard's units first, then any other that no process has claimed yet
        self.prefer = prefer
        self.busy: list = []  # what another process held when this one came to it
        self.claims = claims  # lock each run and evaluation (False: a folder no other process shares)
        self._test_sets: dict = {}
        self._early: dict = {}  # id(cell) -> its reports, computed right after its run was trained
        self._sources: dict = {}  # run name -> "ledger" or "out": where all of its cells are taken from
        self._ledger_runs: dict = {}  # run name -> its cells' reports from one training in the ledger, or None
        self._hashes: dict = {}
        self.trained = 0
        self.reused_runs = 0
        self.evaluated = 0
        self.reused_evals = 0
        self.ledger = None  # a Ledger (--ledger): evaluations kept beyond OUT; tables only (figures need weights)
        self.ledger_runs = 0   # runs not trained: the ledger held every evaluation their cells need
        self.ledger_evals = 0  # evaluations taken from it
        self.ledger_cells = 0  # cells taken from it
        self.filed = 0         # evaluations added to it

    # ---------------------------------------------------------------- training
    def train_all(self, evaluate: bool = False) -> None:
        """Every training run of the plan, in order (each once, whatever number of cells share it). With
        ``evaluate`` (a table), the cells of each run are evaluated as soon as it is trained or found finished,
        so that a grid stopped halfway holds (and has filed in the ledger) every evaluation of the runs it
        finished, not only their weights."""
        protocol = {"experiment": self.plan.experiment.name, "preset": self.plan.preset,
                    "protocol": self.plan.experiment.presets[self.plan.preset].description}
        self.place_runs()
        number = {name: i for i, name in enumerate(self.plan.runs, 1)}
        waiting = []
        for name in self.in_order(list(self.plan.runs)):
            i, cfg = number[name], self.plan.runs[name]
            if self.units is not None and name not in self.units:
                continue
            self.log(f"\n[{i}/{len(self.plan.runs)}] {cfg.out}")
            if not self._train_one(cfg, protocol):
                self.log(f"[busy] {cfg.out}: another process is training it; going on with the rest")
                waiting.append(cfg)
            elif evaluate:
                self._evaluate_run(name)
        # a job of --jobs waits for the runs others are training, so that it can share their cells' evaluations
        # (and trains, resuming, any whose holder has died: its lock is free again) instead of leaving them all
        # to the trainer; a shard (--shard) leaves them to the other shards
        while waiting and self.prefer is not None:
            time.sleep(self.poll_seconds)
            still = []
            for cfg in waiting:
                if not self._train_one(cfg, protocol):
                    still.append(cfg)
                elif evaluate:
                    self._evaluate_run(run_name(cfg))
            waiting = still
        self.busy.extend(cfg.out for cfg in waiting)

    def _evaluate_run(self, name: str) -> None:
        """The cells of run ``name`` that this process computes, evaluated now; their reports are kept for
        :meth:`run` (one another process is computing is left for it, and looked at again there)."""
        for cell in self.plan.cells:
            if cell.train is None or id(cell) in self._early or not self.mine(cell) or run_name(cell.train) != name:
                continue
            reports = self.evaluate_cell(cell)
            if reports is not None:
                self._early[id(cell)] = reports

    poll_seconds = 10.0  # how often a job of --jobs looks again at a run another process is training

    def _train_one(self, cfg, protocol: dict) -> bool:
        """Train, resume or reuse one run; False when another process holds it (it is training it)."""
        if self.ledger is not None and self.group.first(self.ledger_covers, cfg):
            self.log(f"[ledger] {cfg.out}: not trained, every evaluation its cells need is in {self.ledger.folder}")
            self.ledger_runs += 1
            return True
        with self.claim(f"run {Path(cfg.out).resolve()}") as claim:
            if not claim.held:
                return False
            take_pending_stop()  # one left by an earlier job of this process is not this run's
            reused = train_or_reuse(cfg, self.log, protocol, self.group)
            if reused:
                self.reused_runs += 1
            else:
                self.trained += 1
        # a signal in a run's last epoch lets that run finish; the grid stops before the next one
        signum = None if reused else take_pending_stop()
        if self.group.any(signum is not None):
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name if signum else 'a signal to another process'}"
                                 f" after training {cfg.out}; every finished run is kept. Continue with the same "
                                 "command", signum)
        return True

    def in_order(self, units: list) -> list:
        """``units`` (run names, or cells) in the order this process takes them: the plan's, or for a job of
        ``--jobs`` its own shard's first and then the others' from the end of the plan. A static split cannot
        know which runs are already done (a grid that reuses another table's runs), so a job that finishes its
        part takes the work another would reach last; the locks give each unit to one process."""
        if self.prefer is None:
            return units
        from .plan import unit_of
        key = (lambda u: unit_of(u)) if units and isinstance(units[0], Cell) else (lambda u: u)
        own = [u for u in units if key(u) in self.prefer]
        return own + [u for u in units if key(u) not in self.prefer][::-1]

    def claim(self, key: str):
        """The lock on one unit of work (see :class:`UnitLock`); always held without ``claims``. Under torchrun
        rank 0 alone takes it and tells the others (the ranks of one group work on the same unit)."""
        import contextlib
        import types
        if not self.claims:
            return contextlib.nullcontext(types.SimpleNamespace(held=True))
        if not self.group.enabled:
            return UnitLock(self.out, key)
        return _GroupClaim(self, key)

    def place_runs(self) -> None:
        """Every run of the plan given its folder (and the cells their runs' final configs)."""
        root = runs_root(self.out)
        for name, cfg in self.plan.runs.items():
            self.plan.runs[name] = dataclasses.replace(cfg, out=str(self.run_dirs.get(name, root / name)),
                                                       device=self.device, progress=self.progress)
        for cell in self.plan.cells:
            if cell.train is not None:
                cell.train = self.plan.runs[run_name(cell.train)]

    # ---------------------------------------------------------------- models and data
    def model_of(self, cell: Cell):
        """(model, weights file, sha256, provenance) of a cell, in the view its row asks for."""
        from ..checkpoint import load
        from ..device import pick_device
        dev = pick_device(self.device)
        if cell.published is not None:
            from ..foreign.published import load_published
            model, prov = load_published(cell.published, self.model_dir, device=dev)
            sha = prov.get("weights_sha256") or prov.get("sha256")
            weights = prov.get("weights_file", cell.published.name)
        else:
            weights = weights_of(cell.train, self.plan.eval["which"])
            sha = self.sha256(weights)
            model, prov = load(weights, device=dev), {"weights_file": str(weights), "weights_sha256": sha}
        if cell.row.view == "cosine":
            model, prov = cosine_view(model), {**prov, "view": "cos θ: the logits divided by the HE scale s"}
        return model, weights, sha, prov

    model_dir: Optional[Path] = None

    def test_set(self, dataset: str):
        if dataset not in self._test_sets:
            from ..data import load_dataset
            self._test_sets[dataset] = load_dataset(
                dataset, "test", data_dir=self.plan.data.get("data_dir"),
                accept_checksum_mismatch=bool(self.plan.data.get("accept_checksum_mismatch")))
        return self._test_sets[dataset]

    def sha256(self, path) -> str:
        """A file's sha256, computed once per (path, size, modification time)."""
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def resolved_precision(self) -> str:
        """The arithmetic the attacks really use here ("auto" is bf16 on CUDA, fp32-fast on a CPU)."""
        from ..fastpath import check_precision, resolve_precision
        from ..device import pick_device
        return resolve_precision(check_precision(self.plan.eval["precision"]), pick_device(self.device)).precision

    # ---------------------------------------------------------------- evaluation
    def eval_folder(self, cell: Cell) -> Path:
        if cell.published is not None:
            return self.out / "published" / cell.published.name
        return Path(cell.train.out) / "reproduce"

    def evaluate_cell(self, cell: Cell, compute: bool = True) -> Optional[list]:
        """The reports of the cell's evaluation jobs (each reused when already computed, or taken from the
        ledger when the run is not finished here); None when one is missing and ``compute`` is False, or
        another process is computing it."""
        if cell.train is not None:
            name = run_name(cell.train)
            if name not in self._sources:  # decided once per run: all its cells from the ledger, or all from OUT
                if self.group.first(run_state, cell.train) == "finished":
                    self._sources[name] = "out"
                elif self.group.first(self.ledger_run, cell.train) is not None:
                    self._sources[name] = "ledger"
                else:
                    return None  # trained by another process (a shard), not yet finished
            if self._sources[name] == "ledger":
                taken = self.group.first(self.ledger_cell, cell)
                self.ledger_evals += len(taken)
                self.ledger_cells += 1
                return taken
        model = None
        reports = []
        reused = 0  # counted once the cell is whole: a cell looked at again (one of its jobs was busy) counts once
        for job in cell.jobs:
            spec = self.group.first(self.job_spec, cell, job)  # rank 0 hashes the files
            path = self.eval_folder(cell) / f"eval-{digest(spec, 16)}.json"
            saved = self.group.first(saved_result, path, spec)
            if saved is not None:
                if compute:  # (a shard looking at another shard's cell only checks it is there)
                    self.log(f"[reuse] {cell.row.label}: {path}")
                reused += 1
                reports.append({**saved, "path": str(path)})
                continue
            if not compute:
                return None
            with self.claim(f"evaluation {path.resolve()}") as claim:
                saved = self.group.first(saved_result, path, spec)  # finished while this process waited?
                if saved is not None:
                    reused += 1
                    reports.append({**saved, "path": str(path)})
                    continue
                if not claim.held:
                    self.log(f"[busy] {cell.row.label}: another process is computing {path}")
                    self.busy.append(str(path))
                    return None
                if model is None:
                    model, _weights, _sha, prov = self.model_of(cell)
                reports.append(self.run_job(cell, job, spec, model, prov, path))
        self.reused_evals += reused
        self.group.first(self.keep, cell, reports)  # a cell's evaluations are filed together, once all are done
        return reports

    # ---------------------------------------------------------------- the ledger (see .ledger)
    def ledger_key(self, cell: Cell, job: EvalJob) -> dict:
        from .ledger import entry_key
        from .plan import run_key
        return entry_key(run_key(cell.train), self.plan.eval["which"], self.attack_spec(cell, job))

    def cells_of(self, name: str) -> list:
        return [c for c in self.plan.cells if c.train is not None and run_name(c.train) == name]

    def place(self, cell: Cell) -> int:
        return next(i for i, c in enumerate(self.plan.cells) if c is cell)

    def ledger_run(self, cfg) -> Optional[dict]:
        """The reports of every cell of a run from one training in the ledger that holds them all (the cell's
        :meth:`place` -> reports), or None; looked up once per run, so that all its cells come from one source."""
        if self.ledger is None:
            return None
        name = run_name(cfg)
        if name not in self._ledger_runs:
            cells = self.cells_of(name)
            keys = [(cell, self.ledger_key(cell, job)) for cell in cells for job in cell.jobs]
            entries = (self.ledger.covering(name, [key for _cell, key in keys])
                       if cells and all(cell.jobs for cell in cells) else None)
            found = None
            if entries is not None:
                found = {}  # keyed by the cell's place in the plan, the same in every process of a torchrun group
                for (cell, _key), e in zip(keys, entries):
                    found.setdefault(self.place(cell), []).append({**e["result"], "path": e["path"],
                                                                   "ledger": e["run"]})
            self._ledger_runs[name] = found
        return self._ledger_runs[name]

    def ledger_cell(self, cell: Cell) -> list:
        """One cell's reports from its run's training in the ledger (what a torchrun group broadcasts)."""
        return self.ledger_run(cell.train)[self.place(cell)]

    def ledger_covers(self, cfg) -> bool:
        """Whether a run need not be trained here: not finished in OUT, and one training in the ledger holds every
        evaluation of every cell it serves (one at least)."""
        return run_state(cfg) != "finished" and self.ledger_run(cfg) is not None

    def keep(self, cell: Cell, results: list) -> None:
        """File the finished evaluations of a cell whose run is finished in OUT in the ledger, under this
        training, where their keys are free."""
        if self.ledger is None or cell.train is None or not results:
            return
        from .ledger import training_of
        name = run_name(cell.train)
        training = training_of(results[0]["spec"]["weights"]["sha256"])
        items = [(self.ledger_key(cell, job), result) for job, result in zip(cell.jobs, results)]
        if all(self.ledger.intact(self.ledger.path(name, training, key)) for key, _result in items):
            return  # filed already (a damaged entry of this training is filed again)
        run = Path(cell.train.out)
        try:
            self.filed += self.ledger.file(name, items, read_json(run / "summary.json"), train_seconds(run))
        except (OSError, ValueError) as e:  # a read-only checkout, a full disk: the results are safe in OUT
            self.log(f"[ledger] {name}: not filed in {self.ledger.folder} ({e}); the results are kept in {run}")

    def job_spec(self, cell: Cell, job: EvalJob) -> dict:
        """What an evaluation depends on; its hash names the result file."""
        return {"weights": self.weights_spec(cell), **self.attack_spec(cell, job)}

    def weights_spec(self, cell: Cell) -> dict:
        """The model file(s) an evaluation attacks, by digest."""
        if cell.published is not None:  # the entry (definition, arguments, normalisation) and both files
            from ..foreign.published import definition_path, weights_path
            spec = cell.published
            weights = {"published": {k: v for k, v in dataclasses.asdict(spec).items()
                                     if k not in ("label", "architecture", "extra_data")},
                       "sha256": self.sha256(weights_path(spec, self.model_dir))}
            definition = definition_path(spec, self.model_dir)
            if definition is not None:
                weights["definition_sha256"] = self.sha256(definition.rpartition(":")[0])
        else:
            weights = {"sha256": self.sha256(weights_of(cell.train, self.plan.eval["which"])),
                       "which": self.plan.eval["which"]}
        return weights

    def attack_spec(self, cell: Cell, job: EvalJob) -> dict:
        """Everything else an evaluation depends on: the view, the data, ε and every attack's parameters."""
        e = self.plan.eval
        eps = self.eps_of(cell.dataset)
        return {"view": cell.row.view, "dataset": cell.dataset, "n": job.n,
                "restarts": job.restarts, "steps": e["steps"], "eps": eps, "seed": e["seed"],
                "attacks": [list(a) for a in job.attacks], "precision": self.resolved_precision(),
                "resolved": resolved_attacks(job, e, eps), "version": EVAL_VERSION,
                **({"data": "checksum mismatch accepted"} if self.plan.data.get("accept_checksum_mismatch") else {})}

    def eps_of(self, dataset: str) -> float:
        """The evaluation's ε: the config's, or the dataset's default (resolved, so a changed default is
        another evaluation)."""
        eps = self.plan.eval.get("eps")
        if eps is None:
            from ..data import get_dataset_info
            eps = get_dataset_info(dataset).default_eps
        return _number(eps)

    def run_job(self, cell: Cell, job: EvalJob, spec: dict, model, prov: dict, path: Path) -> dict:
        from ..attacks import build_attack
        from ..evaluate import evaluate
        from ..progress import EvaluationProgress
        from ..device import pick_device
        e = self.plan.eval
        test = self.test_set(cell.dataset)
        eps = self.eps_of(cell.dataset)
        attacks = [(name, build_attack(attack, model, overrides=params, eps=eps, alpha=eps / 4, steps=e["steps"],
                                       restarts=job.restarts, seed=e["seed"], precision=e["precision"]))
                   for name, attack, params in job.attacks] or ["pgd"]
        self.log(f"[evaluate] {cell.row.label}"
                 + (f" ({', '.join(f'{k}={v}' for k, v in cell.combo.items())})" if cell.combo else "")
                 + f": {', '.join(a[0] for a in job.attacks) or 'clean'} on {job.n} images, "
                 + f"{job.restarts} restart{'s' if job.restarts > 1 else ''}")
        t0 = time.time()
        # every finished batch is kept beside the result-to-be, so a grid stopped inside a long evaluation (AA on
        # 10,000 CIFAR images) continues from its last batch; the batches are cut by batch_size, hence the name
        partial = path.with_name(f"{path.stem}-b{e['batch_size']}.partial")
        saved = EvaluationProgress(partial) if self.group.main else None
        # a stop signal ends the evaluation after its current batch (saved): a job of --jobs gets SIGTERM
        try:
            with graceful_stop() as stop:
                rep = evaluate(model, test, attacks=attacks, eps=eps, steps=e["steps"], restarts=job.restarts,
                               n=job.n, batch_size=e["batch_size"], seed=e["seed"], device=pick_device(self.device),
                               progress=self.progress, precision=e["precision"], provenance=prov, group=self.group,
                               saved=saved, stop=stop, log=lambda line: self.log(f"  {line}"),  # bound, results
                               config={"dataset": cell.dataset, "split": "test", "model_description": cell.row.label})
        except RunInterrupted as stopped:
            raise RunInterrupted(f"{stopped} (in {partial}). Continue with the same command", stopped.signum) from None
        result = {"spec": spec, "row": cell.row.label, "combo": cell.combo, "seconds": time.time() - t0,
                  "report": rep.to_dict()}
        if self.group.main:
            write_json(path, result)
            for kept in path.parent.glob(f"{path.stem}-b*.partial"):  # all of it is in the result now (also the
                shutil.rmtree(kept, ignore_errors=True)               # batches of a try with another batch size)
        self.evaluated += 1
        # a signal during its last batch let the evaluation finish: the grid stops now, not after its whole queue
        if self.group.any(stop.requested):
            take_pending_stop()
            raise RunInterrupted(f"stopped by {stop.name or 'a signal to another process'} after the evaluation "
                                 f"{path}; every finished evaluation is saved. Continue with the same command",
                                 stop.signum)
        return {**result, "path": str(path)}

    def weights_epoch(self, cell: Cell, ledger: Optional[dict] = None) -> Optional[int]:
        """The epoch whose weights the cell's evaluations attacked (the best one's, or the last); None for a
        published model. ``ledger``: the run's record in the ledger, where its reports came from."""
        if cell.train is None:
            return None
        done = ledger["summary"] if ledger else read_json(Path(cell.train.out) / "summary.json")
        return done["best"]["epoch"] if self.plan.eval["which"] == "best" else done["last"]["epoch"]

    # ---------------------------------------------------------------- the whole plan
    def mine(self, cell: Cell) -> bool:
        """Whether this process computes the cell (all of them, or its shard's)."""
        from .plan import unit_of
        return self.units is None or unit_of(cell) in self.units

    def run(self, compute: bool = True) -> Optional[dict]:
        """Train, evaluate, and return the table's data (see :mod:`.tables`); None while a cell is missing
        (another shard's, or one another process is computing; ``self.missing`` names them). With ``compute``
        False nothing is trained or attacked: the table is collected from what ``OUT`` holds."""
        from .tables import aggregate, cell_outcomes, cell_values, shared_values
        t0 = time.time()
        if compute:
            self.train_all(evaluate=True)
        else:
            self.place_runs()
        cells, outcomes, self.missing = [], [], []
        columns = self.plan.experiment.columns
        found = {id(cell): self._early.pop(id(cell)) if id(cell) in self._early
                 else self.evaluate_cell(cell, compute=compute and self.mine(cell))
                 for cell in self.in_order(list(self.plan.cells))}
        one_training_per_run(self.plan.cells, found)
        for cell in self.plan.cells:  # the table in the plan's order, whatever order the cells were computed in
            reports = found[id(cell)]
            if reports is None:
                self.missing.append(cell)
                continue
            ledger = reports[0].get("ledger") if reports else None
            cells.append({"row": cell.row.label, "row_group": cell.row_group, "column_group": cell.column_group,
                          "combo": cell.combo, "architecture": _architecture(cell), "seed": cell.seed,
                          "values": cell_values(columns, reports), "shared": shared_values(columns, reports),
                          # a ledger cell's run: the training's folder in the ledger (OUT has no such run)
                          "run": (str(Path(reports[0]["path"]).parent) if ledger
                                  else cell.train.out if cell.train is not None else None),
                          "epoch": self.group.first(self.weights_epoch, cell, ledger),
                          "flags": _fired(reports, columns) + _unfound(columns, reports),
                          "n": max(r["report"]["n"] for r in reports), "reports": [r["path"] for r in reports],
                          "evaluations": [r["spec"] for r in reports],
                          **({"ledger": {"train_seconds": ledger["train_seconds"]}} if ledger else {})})
            outcomes.append(cell_outcomes(columns, reports))
        if self.missing:
            return None
        rows, comparisons = aggregate(self.plan, cells, outcomes)
        summary = self.summary(rows, time.time() - t0, comparisons)
        summary["work"] = self.group.first(work_seconds, cells)
        if self.ledger is not None:
            taken = [c for c in cells if c.get("ledger")]
            summary["ledger"] = {"folder": str(self.ledger.folder), "cells": len(taken), "of": len(cells),
                                 "runs": sorted({c["run"] for c in taken})}
        return summary

    def missing_text(self) -> str:
        """What the table still waits for, one line per cell (for --collect and a shard's last words), after how
        many of its cells are done (and how many of those the ledger gave)."""
        total = len(self.plan.cells)
        done = (f"  ({total - len(self.missing)} of its {total} cells are done"
                + (f", {self.ledger_cells} of them from the ledger {self.ledger.folder}" if self.ledger else "")
                + "; missing:)\n")
        return done + "\n".join(f"  {c.row.label}" + (f" ({', '.join(f'{k}={v}' for k, v in c.combo.items())})"
                                                if c.combo else "")
                         + (f", seed {c.seed}" if c.seed is not None else "")
                         + (f": {c.train.out}" if c.train is not None else "") for c in self.missing)

    def summary(self, rows: list, seconds: float, comparisons: Optional[list] = None) -> dict:
        exp = self.plan.experiment
        return {"experiment": exp.name, "title": exp.title, "paper": exp.paper, "notes": exp.notes,
                "preset": self.plan.preset, "protocol": exp.presets[self.plan.preset].description,
                "seeds": self.plan.seeds, "comparisons": comparisons or [],
                "columns": [dataclasses.asdict(c) for c in exp.columns], "rows": rows,
                "column_groups": self.plan.column_groups, "row_groups": self.plan.row_groups,
                "column_group_by": exp.column_group_by, "row_group_by": exp.row_group_by,
                "paper_tables": exp.paper_tables, "eval": self.plan.eval, "overrides": self.plan.overrides,
                "runs": {k: resolved_dict(v) for k, v in self.plan.runs.items()},
                "counts": {"trained": self.trained, "reused_runs": self.reused_runs, "evaluated": self.evaluated,
                           "reused_evaluations": self.reused_evals,
                           **({"ledger_runs": self.ledger_runs, "ledger_evaluations": self.ledger_evals,
                               "filed": self.filed} if self.ledger is not None else {})},
                "seconds": seconds, "command": command_line(), "environment": environment_info()}


def one_training_per_run(cells: list, found: dict) -> None:
    """Every cell of one run attacked the same weights: a table never mixes two trainings of a run (as a run that
    another process finished while this one read the ledger could otherwise make it)."""
    shas: dict = {}
    for cell in cells:
        for r in found.get(id(cell)) or []:
            if cell.train is not None:
                shas.setdefault(run_name(cell.train), set()).add(r["spec"]["weights"]["sha256"])
    mixed = {name: sorted(s) for name, s in shas.items() if len(s) > 1}
    if mixed:  # the runner takes each run from one source; this holds whatever a future change does to that
        raise ValueError("the cells of " + "; ".join(f"run {n} attacked different weights ({', '.join(x[:12] for x in s)})"
                                                     for n, s in mixed.items())
                         + "; a table must not combine two trainings of one run")


def train_seconds(run) -> float:
    """The time a run's training epochs took (metrics.jsonl), over every session that trained it."""
    from ..io import read_jsonl
    from ..train import METRICS_NAME
    path = Path(run) / METRICS_NAME
    return sum(float(r.get("seconds", 0.0)) for r in read_jsonl(path)) if path.exists() else 0.0


def work_seconds(cells: list) -> dict:
    """The time the table's results took, whichever process, session or machine computed them: the training
    epochs of its runs (metrics.jsonl, or the ledger's record) and its evaluations (each result's own time),
    summed."""
    from .ledger import SUFFIX, read_entry
    runs = {c["run"]: (c.get("ledger") or {}).get("train_seconds") for c in cells if c["run"]}
    train = sum(float(kept) if kept is not None else train_seconds(run) for run, kept in runs.items())
    evaluations = {p: (read_entry(p)["result"] if p.endswith(SUFFIX) else read_json(p)).get("seconds", 0.0)
                   for c in cells for p in c["reports"]}
    return {"train_seconds": train, "eval_seconds": float(sum(evaluations.values())), "runs": len(runs),
            "evaluations": len(evaluations)}


def resolved_attacks(job: EvalJob, e: dict, eps: float) -> list:
    """Every attack of the job with all its parameters, defaults included (built on a stand-in model): an
    evaluation computed before a default changed is not reused for the new one."""
    import torch

    from ..attacks import build_attack
    def plain(d):  # the arithmetic is in the key already, resolved ("auto" and its outcome are one setting)
        if isinstance(d, dict):
            return {k: plain(v) for k, v in d.items() if k not in ("precision", "ran_as")}
        return d

    stand_in = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    return [plain(json.loads(json.dumps(build_attack(attack, stand_in, overrides=params, eps=eps, alpha=eps / 4,
                                                     steps=e["steps"], restarts=job.restarts, seed=e["seed"],
                                                     precision=e["precision"]).params(), default=str)))
            for _name, attack, params in job.attacks]


def _fired(reports: list, columns: list) -> list:
    """The evaluator's sanity checks that fired on this cell (gradient masking, a saturated softmax, an attack
    that left the threat model, ...), once each: a table must not hide what its reports warn about.

    "A black-box attack beat the white-box ones" is a function of the stored results alone, and it is taken
    again here, with the columns' black-box attacks known by their attack, not their label. Evaluations stored
    before this was fixed took a labelled SPSA ("spsa[samples=64]") for a white-box column, so that on Table 9's
    mini run the flag compared RayS with SPSA.

    "Rescaling the logits helps PGD" is judged again from its stored measurement by the current rule
    (:func:`~sirobust.sanity.scale_sensitivity_flag`): the rule before it fired on one example of 64."""
    from ..report import AttackResult
    from ..sanity import BLACK_BOX, result_flags, scale_sensitivity_flag
    from .plan import result_name
    black = {result_name(c) for c in columns if c.attack in BLACK_BOX} | set(BLACK_BOX)
    known = {f.name for f in dataclasses.fields(AttackResult)}
    out: dict = {}
    for r in reports:
        results = {k: AttackResult(**{f: v for f, v in a.items() if f in known})
                   for k, a in r["report"]["attacks"].items()}
        again = [f for f in result_flags(results, r["report"]["n"], black_box=black & set(results))
                 if f["name"] == "black_box_beats_white_box"]
        stored = [scale_sensitivity_flag(f["value"]) if f["name"] == "scale_sensitivity" and f.get("value") else f
                  for f in r["report"].get("flags", []) if f["name"] != "black_box_beats_white_box"]
        for f in stored + again:
            if f.get("triggered") and f["name"] not in out:
                out[f["name"]] = {"name": f["name"], "message": f.get("message", "")}
    return list(out.values())


def _unfound(columns: list, reports: list) -> list:
    """RayS's ADBD is a mean over the examples whose boundary it found: say how many it did not find."""
    from .plan import result_name
    out = []
    for col in columns:
        if col.value != "adbd":
            continue
        for r in reports:
            stats = (r["report"]["attacks"].get(result_name(col)) or {}).get("stats") or {}
            missed = (stats.get("adbd") or {}).get("not_found")
            if missed:
                out.append({"name": "adbd_boundary_not_found",
                            "message": f"{col.label}: {result_name(col)} found no decision boundary within its query "
                                       f"budget for {missed} of the {missed + stats['adbd']['found']} clean-correct "
                                       "examples; the mean leaves them out"})
    return out


def _architecture(cell: Cell) -> str:
    if cell.published is not None:
        return cell.published.architecture
    from .plan import MODEL_NAMES
    return MODEL_NAMES.get(cell.train.model, cell.train.model)


def _number(value) -> float:
    from ..checks import parse_number
    return parse_number(value, "eval.eps") if isinstance(value, str) else float(value)


def cosine_view(model):
    """An HE model as Pang et al.'s code returns it: ``cos θ``, its ``s · cos θ`` logits divided by s."""
    from ..models import ScaledLogits
    head = getattr(model, "head", None)
    scale = getattr(head, "scale", None)
    if scale is None:
        raise ValueError("view = \"cosine\" needs a model with a cosine head (an HE model); this one has none")
    return ScaledLogits(model, 1.0 / float(scale))
