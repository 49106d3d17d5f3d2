"""Reading an experiment's config (TOML, or YAML read safely) and checking every key before anything runs.

A config describes one table or figure of the paper: the training runs (a base ``[train]`` table,
``[axes]`` whose product makes the column and row groups, and ``[[rows]]``), the evaluation
(``[eval]`` and ``[[columns]]``), a figure's own settings (``[figure]``), published models
(``[[models]]``, Table 5), the presets (``[presets.smoke|mini|paper]``) and the paper's own numbers
(``[[paper_tables]]``, printed under the computed table). The full reference is
docs/reproduction.md; the packaged configs in ``sirobust/reproduce/configs/`` are the examples.

Reading a config executes nothing: TOML has no tags, and YAML is read with a loader that knows
only plain scalars, lists and mappings (a ``!!python/object`` tag is an error naming its key).
A published model's ``definition`` file is code, run when that model is loaded: its sha256
(``definition_sha256``) is checked first, as the weights' is.
An unknown key, or a value of the wrong type, is an error that names the key's full path.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

KINDS = ("table", "figure")
PRESETS = ("smoke", "mini", "paper")
VALUES = ("natural", "robust", "worst_case", "adbd")
VIEWS = ("logits", "cosine")
FIGURES = ("fig1", "fig3", "fig4", "fig5")
# TrainConfig fields a config may not set: where a run lives and how it shows progress are the runner's
_RUNNER_FIELDS = ("out", "progress", "tensorboard", "device")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------- reading files

def read_config_file(path: Path) -> dict:
    """The mapping in a .toml, .yaml or .yml file (YAML: plain data only)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: cannot be read ({e})") from None
    if suffix == ".toml":
        return _read_toml(text, path)
    if suffix in (".yaml", ".yml"):
        return _read_yaml(text, path)
    raise ConfigError(f"config {path}: the file must end in .toml, .yaml or .yml")


def toml_module():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _read_toml(text: str, path: Path) -> dict:
    tomllib = toml_module()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML ({e})") from None


def _read_yaml(text: str, path: Path) -> dict:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigError(f"config {path}: reading YAML needs the pyyaml package (pip install pyyaml), "
                          "or write the config in TOML") from None

    class PlainLoader(yaml.SafeLoader):
        """SafeLoader without even its safe extras: a tag other than the core scalars is refused."""

    def refuse(loader, suffix, node):
        raise ConfigError(f"config {path}, line {node.start_mark.line + 1}{_yaml_key(text, node.start_mark.line)}: "
                          f"the YAML tag {node.tag!r} constructs an object; configs hold plain values only")

    def unquoted(loader, node):  # a date or a timestamp written bare: YAML would make it an object
        raise ConfigError(f"config {path}, line {node.start_mark.line + 1}{_yaml_key(text, node.start_mark.line)}: "
                          f"{node.value!r} reads as a date; quote it (\"{node.value}\") if it is text")

    PlainLoader.add_multi_constructor("", refuse)  # every tag that is not a standard one
    PlainLoader.add_constructor("tag:yaml.org,2002:timestamp", unquoted)
    for tag in ("tag:yaml.org,2002:binary", "tag:yaml.org,2002:set", "tag:yaml.org,2002:omap",
                "tag:yaml.org,2002:pairs"):
        PlainLoader.add_constructor(tag, lambda loader, node: refuse(loader, "", node))
    try:
        data = yaml.load(text, Loader=PlainLoader)  # noqa: S506 (PlainLoader builds plain data only)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e})") from None
    return {} if data is None else data


def _yaml_key(text: str, line: int) -> str:
    """' (key "name")' for the mapping key on or above a YAML line, to name where a bad tag sits."""
    lines = text.splitlines()
    for i in range(min(line, len(lines) - 1), -1, -1):
        head = lines[i].split("#", 1)[0].strip().lstrip("- ")
        if ":" in head:
            return f' (key "{head.split(":", 1)[0].strip()}")'
    return ""


# ---------------------------------------------------------------- checking values

def _type_name(t) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
            dict: "a table"}.get(t, getattr(t, "__name__", str(t)))


def check_value(value, kind, where: str):
    """``value`` as ``kind`` (str, int, float, bool, list, dict, ("list", kind), ("choice", values),
    ("union", kinds)); ints are accepted as floats, never bools as numbers."""
    if isinstance(kind, tuple) and kind[0] == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [check_value(v, kind[1], f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(kind, tuple) and kind[0] == "choice":
        if value not in kind[1]:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, kind[1]))}, got {_show(value)}")
        return value
    if isinstance(kind, tuple) and kind[0] == "union":
        for k in kind[1]:
            try:
                return check_value(value, k, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(k) for k in kind[1])}, got {_show(value)}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool) or kind in (int, float) and isinstance(value, bool) \
            or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {_type_name(kind)}, got {_show(value)}")
    return value


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def check_table(d, schema: dict, where: str) -> dict:
    """Every key of ``d`` known to ``schema`` and of its type; returns the checked values."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table, got {_show(d)}")
    unknown = sorted(map(str, set(d) - set(schema)))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(schema))})")
    out = {}
    for key, value in d.items():
        kind = schema[key]
        path = f"{where}.{key}"
        if isinstance(kind, dict):
            out[key] = check_table(value, kind, path)
        elif callable(kind) and not isinstance(kind, type):
            out[key] = kind(value, path)
        else:
            out[key] = check_value(value, kind, path)
    return out


# ---------------------------------------------------------------- TrainConfig fields

def _train_kinds() -> dict:
    """TrainConfig field -> the value kind a config may give it (from the dataclass annotations)."""
    from ..train import TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _RUNNER_FIELDS:
            continue
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t
        base = typing.get_origin(base) or base
        if f.name == "val_size":  # a fraction or a count
            kinds[f.name] = ("union", (int, float))
        elif base is tuple:
            kinds[f.name] = ("list", int)
        else:
            kinds[f.name] = base
    return kinds


def train_table(d, where: str) -> dict:
    """A table of TrainConfig fields (``[train]``, a row's ``train``, a preset's ``train`` or ``force``)."""
    return check_table(d, _train_kinds(), where)


def axes_table(d, where: str) -> dict:
    kinds = _train_kinds()
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table, got {_show(d)}")
    out = {}
    for key, values in d.items():
        if key not in kinds:
            raise ConfigError(f"{where}.{key}: unknown key (an axis is a training field: {', '.join(sorted(kinds))})")
        values = check_value(values, ("list", kinds[key]), f"{where}.{key}")
        if not values:
            raise ConfigError(f"{where}.{key}: an axis needs at least one value")
        out[key] = values
    return out


def _defense_tables(d, where: str) -> dict:
    """{defense (canonical name): training settings}: a misspelt defense is an error, never a silent miss."""
    from ..defenses import canonical_defense
    out = {}
    for key, value in check_value(d, dict, where).items():
        try:
            name = canonical_defense(key)
        except ValueError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
        out[name] = train_table(value, f"{where}.{key}")
    return out


EVAL_SCHEMA = {
    "n": int,                 # test images (the first n)
    "steps": int,             # attack steps (the paper: 20)
    "eps": ("union", (float, str)),  # pixel units; "8/255" accepted; default: the dataset's
    "batch_size": int,
    "seed": int,
    "which": ("choice", ("last", "best")),  # weights evaluated: the last epoch's (the paper's protocol) or the best
    "precision": ("choice", ("auto", "fp32", "fp32-fast", "bf16")),
    "attack_params": dict,    # {attack: {param: value}} for every column of that attack
    "attack_n": dict,         # {attack: n}: fewer images for a costly attack (AutoAttack on a CPU)
}
COLUMN_SCHEMA = {
    "label": str,
    "value": ("choice", VALUES),   # natural: clean accuracy; robust: accuracy under `attack`; adbd: RayS's distance
    "attack": str,
    "params": dict,
    "restarts": int,
    "group": str,                  # a header spanning several columns ("5 random restarts", "SPSA")
}
ROW_SCHEMA = {
    "label": str,
    "train": train_table,
    "model": str,                  # a published model's name (from [[models]]): evaluated, not trained
    "view": ("choice", VIEWS),     # cosine: the model's logits divided by its HE scale s (Pang et al.'s code)
}
PRESET_SCHEMA = {
    "description": str,
    "axes": axes_table,
    "train": train_table,          # under the rows' own settings
    "force": train_table,          # over everything (a preset's dataset and model)
    "defense_train": lambda d, where: _defense_tables(d, where),  # per defense, over the row
    "eval": EVAL_SCHEMA,
    "figure": dict,                # checked against the figure's own schema
    "rows": ("list", str),         # only these rows (labels)
    "seeds": ("list", int),        # the training seeds, a grid axis (each cell: mean ± sd over them)
}
FIGURE_SCHEMAS = {
    "fig1": {"alpha_min": float, "alpha_max": float, "points": int, "attacks": ("list", str), "model": str},
    "fig3": {"images": int, "grid": int, "steps": int, "seed": int, "model": str},
    "fig4": {"n": int, "deltas": ("list", float), "steps": int, "seed": int, "models": ("list", str),
             "directions": int},
    "fig5": {"n": int, "bins": int, "steps": int, "seed": int, "models": ("list", str)},
}
TOP_SCHEMA = {
    "name": str, "kind": ("choice", KINDS), "title": str, "paper": str, "notes": ("list", str),
    "figure_kind": ("choice", FIGURES),
    "column_group_by": str, "row_group_by": str,
    "axes": axes_table, "train": train_table, "eval": EVAL_SCHEMA, "figure": dict,
    "columns": ("list", dict), "rows": ("list", dict), "models": ("list", dict), "presets": dict,
    "paper_tables": ("list", dict),
    "seeds": ("list", int),        # the training seeds, a grid axis (default: one run, train.seed)
    "comparisons": ("list", dict), # paired tests under the table (default: every row with SI against its base)
}
# A comparison the table's statements test, row against row on the same test points (see .stats).
COMPARISON_SCHEMA = {"base": str, "other": str}
# The paper's own numbers, printed under the computed table so that the two are read side by side.
PAPER_TABLE_SCHEMA = {
    "setting": str,   # what the paper ran: "CIFAR-10, ResNet18, 120 epochs, ε = 8/255"
    "rows": dict,     # {row label: {column key: the value as printed (accuracy in %, ADBD as a distance)}}
}


@dataclass
class Column:
    label: str
    value: str = "robust"
    attack: Optional[str] = None
    params: dict = field(default_factory=dict)
    restarts: int = 1
    group: str = ""


@dataclass
class Row:
    label: str
    train: dict = field(default_factory=dict)
    model: Optional[str] = None
    view: str = "logits"


@dataclass
class Preset:
    description: str = ""
    axes: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    force: dict = field(default_factory=dict)
    defense_train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    figure: dict = field(default_factory=dict)
    rows: Optional[list] = None
    seeds: Optional[list] = None


@dataclass
class Experiment:
    name: str
    kind: str
    title: str
    source: str
    paper: str = ""
    notes: list = field(default_factory=list)
    figure_kind: Optional[str] = None
    column_group_by: Optional[str] = None
    row_group_by: Optional[str] = None
    axes: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    figure: dict = field(default_factory=dict)
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    models: list = field(default_factory=list)   # PublishedModel
    presets: dict = field(default_factory=dict)  # name -> Preset
    paper_tables: list = field(default_factory=list)  # [{"setting": str, "rows": {label: {column: value}}}]
    seeds: Optional[list] = None                      # None: one run per cell, at its train.seed
    comparisons: Optional[list] = None                # [(base label, other label)]; None: every ± SI pair


def parse_experiment(data: Any, source: str) -> Experiment:
    """Check a config's content (see the module docstring) and return it as an :class:`Experiment`."""
    d = check_table(data, TOP_SCHEMA, source)
    for key in ("name", "kind", "title"):
        if key not in d:
            raise ConfigError(f"{source}.{key}: missing (every config has name, kind and title)")
    kind = d["kind"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", d["name"]) or ".." in d["name"]:
        raise ConfigError(f"{source}.name: {d['name']!r} must be a plain name (letters, digits, _ . -): it names "
                          "the results folder")
    if kind == "figure" and "figure_kind" not in d:
        raise ConfigError(f"{source}.figure_kind: missing (a figure config names one of {', '.join(FIGURES)})")
    fig_schema = FIGURE_SCHEMAS.get(d.get("figure_kind"), {})
    figure = check_table(d.get("figure", {}), fig_schema, f"{source}.figure")
    train_fields = _train_kinds()
    for key in ("column_group_by", "row_group_by"):
        if key in d and d[key] not in train_fields:
            raise ConfigError(f"{source}.{key}: {d[key]!r} is not a training field (one of "
                              f"{', '.join(sorted(train_fields))})")
    columns = [_column(c, f"{source}.columns[{i}]") for i, c in enumerate(d.get("columns", []))]
    if kind == "table" and not columns:
        raise ConfigError(f"{source}.columns: a table needs at least one column")
    keys = [f"{c.group} / {c.label}" if c.group else c.label for c in columns]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ConfigError(f"{source}.columns[{i}]: a column {key!r} already exists; give it another label or "
                              "group")
    models = [_published(m, f"{source}.models[{i}]") for i, m in enumerate(d.get("models", []))]
    names = [m.name for m in models]
    rows = [_row(r, f"{source}.rows[{i}]", names) for i, r in enumerate(d.get("rows", []))]
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"{source}.rows: the label {dup!r} is used twice")
    presets = {}
    raw_presets = check_value(d.get("presets", {}), dict, f"{source}.presets")
    for name, p in raw_presets.items():
        if name not in PRESETS:
            raise ConfigError(f"{source}.presets.{name}: unknown preset (allowed: {', '.join(PRESETS)})")
        p = check_table(p, PRESET_SCHEMA, f"{source}.presets.{name}")
        p["figure"] = check_table(p.get("figure", {}), fig_schema, f"{source}.presets.{name}.figure")
        for label in p.get("rows") or []:
            if label not in labels:
                raise ConfigError(f"{source}.presets.{name}.rows: no row is labelled {label!r} "
                                  f"(rows: {', '.join(labels)})")
        if "seeds" in p:
            p["seeds"] = check_seeds(p["seeds"], f"{source}.presets.{name}.seeds")
        presets[name] = Preset(**p)
    paper_tables = [_paper_table(t, f"{source}.paper_tables[{i}]", labels, keys)
                    for i, t in enumerate(d.get("paper_tables", []))]
    return Experiment(name=d["name"], kind=kind, title=d["title"], source=source, paper=d.get("paper", ""),
                      notes=d.get("notes", []), figure_kind=d.get("figure_kind"),
                      column_group_by=d.get("column_group_by"), row_group_by=d.get("row_group_by"),
                      axes=d.get("axes", {}), train=d.get("train", {}), eval=d.get("eval", {}), figure=figure,
                      columns=columns, rows=rows, models=models, presets=presets, paper_tables=paper_tables,
                      seeds=check_seeds(d["seeds"], f"{source}.seeds") if "seeds" in d else None,
                      comparisons=_comparisons(d["comparisons"], f"{source}.comparisons", labels)
                      if "comparisons" in d else None)


def check_seeds(seeds: list, where: str) -> list:
    """A seed axis: at least one seed, each an integer >= 0, none twice."""
    if not seeds:
        raise ConfigError(f"{where}: give at least one seed")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where}[{i}]: a seed is an integer >= 0, got {_show(s)}")
    dup = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if dup is not None:
        raise ConfigError(f"{where}: the seed {dup} is given twice")
    return list(seeds)


def _comparisons(items: list, where: str, labels: list) -> list:
    """(base, other) row labels of each declared comparison, both rows present and different."""
    out = []
    for i, c in enumerate(items):
        c = check_table(c, COMPARISON_SCHEMA, f"{where}[{i}]")
        for key in ("base", "other"):
            if key not in c:
                raise ConfigError(f"{where}[{i}].{key}: missing (a comparison names two rows: base and other)")
            if c[key] not in labels:
                raise ConfigError(f"{where}[{i}].{key}: no row is labelled {c[key]!r} (rows: {', '.join(labels)})")
        if c["base"] == c["other"]:
            raise ConfigError(f"{where}[{i}]: a row compared with itself ({c['base']!r})")
        out.append((c["base"], c["other"]))
    return out


def _paper_table(t, where: str, labels: list, keys: list) -> dict:
    """One block of the paper's numbers: every row and column it names must exist in the config, so a
    renamed row never leaves a paper value silently unprinted."""
    t = check_table(t, PAPER_TABLE_SCHEMA, where)
    if "setting" not in t:
        raise ConfigError(f"{where}.setting: missing (say what the paper ran: dataset, model, epochs)")
    rows = {}
    for label, values in t.get("rows", {}).items():
        if label not in labels:
            raise ConfigError(f"{where}.rows.{label}: no row is labelled {label!r} (rows: {', '.join(labels)})")
        values = check_value(values, dict, f"{where}.rows.{label}")
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(f"{where}.rows.{label}.{key}: no column {key!r} (columns: {', '.join(keys)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.rows.{label}.{key}: expected a number, got {_show(value)}")
        rows[label] = {k: float(v) for k, v in values.items()}
    if not rows:
        raise ConfigError(f"{where}.rows: empty (list the paper's numbers by row label and column)")
    return {"setting": t["setting"], "rows": rows}


def _column(c, where: str) -> Column:
    c = check_table(c, COLUMN_SCHEMA, where)
    if "label" not in c:
        raise ConfigError(f"{where}.label: missing")
    col = Column(**c)
    if col.value in ("robust", "adbd") and not col.attack:
        raise ConfigError(f"{where}.attack: missing (a {col.value!r} column names the attack it reports)")
    if col.value in ("natural", "worst_case") and col.attack:
        raise ConfigError(f"{where}.attack: a {col.value!r} column takes no attack")
    if col.attack:
        from ..attacks.registry import canonical_attack_name
        try:
            col.attack = canonical_attack_name(col.attack)
        except ValueError as e:
            raise ConfigError(f"{where}.attack: {e}") from None
    if col.value == "adbd" and col.attack != "rays":
        raise ConfigError(f"{where}.attack: an \"adbd\" column reports RayS's decision-boundary distance; its attack "
                          f"is \"rays\", got {col.attack!r}")
    if col.restarts < 1:
        raise ConfigError(f"{where}.restarts: must be at least 1, got {col.restarts}")
    return col


def _row(r, where: str, models: list) -> Row:
    r = check_table(r, ROW_SCHEMA, where)
    if "label" not in r:
        raise ConfigError(f"{where}.label: missing")
    row = Row(**r)
    if row.model is not None:
        if row.model not in models:
            raise ConfigError(f"{where}.model: no published model named {row.model!r} in [[models]] "
                              f"({', '.join(models) or 'none listed'})")
        if row.train:
            raise ConfigError(f"{where}.train: a row of a published model is not trained")
    return row


def _published(m, where: str):
    from ..foreign.published import PublishedModel
    try:
        return PublishedModel.from_dict(m, where=where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
