"""The packages of sirobust import in one direction (DESIGN.md, "Packages import in one direction").

Every ``import`` in src/sirobust is read, those inside functions too (a lazy import is still a dependency),
and grouped by unit: a top-level module or subpackage of ``sirobust``. A unit never imports one of a higher
layer, and no units import each other round in a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sirobust"

# top to bottom; a unit not named here belongs to the bottom layer (losses, features, threat, models, data and
# the owners: checks, io, runfolder, rng, fastpath, registry, tables, ...)
LAYERS = [
    {"sirobust", "__main__", "cli"},  # the facade (sirobust/__init__.py) and the command line
    {"reproduce", "demo"},
    {"experiments"},
    # the trainer is train.py (the loop) with its config, state, files and per-epoch measurements;
    # evaluation_inputs: what evaluate takes in, checked; sanity: its flags on the model, the attacks and results
    {"train", "train_config", "train_state", "train_files", "train_eval", "evaluate", "evaluation_inputs", "sanity"},
    {"defenses", "attacks"},
]
BOTTOM = len(LAYERS)
PENDING: set = set()  # known upward edges still to remove (none)


def layer(unit: str) -> int:
    return next((i for i, units in enumerate(LAYERS) if unit in units), BOTTOM)


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def imports(path: Path) -> set[str]:
    """The sirobust modules (or names of them) that ``path`` imports anywhere in its body."""
    name, package = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + package]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from .pkg import module`` imports the module; ``from .pkg import name``, a name of pkg's __init__
            found |= {f"{prefix}.{a.name}" if is_module(f"{prefix}.{a.name}") else prefix for a in node.names}
    return {m for m in found if m == "sirobust" or m.startswith("sirobust.")}


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sirobust"


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Each circle a depth-first walk of ``graph`` meets, as "a -> b -> a"."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def unit_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: [the modules that import it]}."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, _ = module_name(path)
        for target in imports(path):
            if unit(target) != unit(name):
                graph.setdefault(unit(name), {}).setdefault(unit(target), []).append(name)
    return graph


def test_no_unit_imports_a_higher_layer():
    upward = [f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)}) in {', '.join(sorted(set(by)))}"
              for src, targets in unit_graph().items() for dst, by in targets.items()
              if layer(dst) < layer(src) and (src, dst) not in PENDING]
    assert not upward, "\n".join(upward)


def test_no_import_circle_between_units():
    graph = {src: {dst for dst in targets if (src, dst) not in PENDING} for src, targets in unit_graph().items()}
    assert not circles(graph), "\n".join(circles(graph))


def test_no_import_circle_inside_the_attacks():
    """AutoAttack builds its stages from attacks/stages.py; the registry sits above it (issue 20)."""
    modules = {module_name(p)[0]: p for p in sorted((PACKAGE / "attacks").glob("*.py"))}
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert "sirobust.attacks.registry" not in graph["sirobust.attacks.autoattack"]
    assert not circles(graph), "\n".join(circles(graph))


def test_the_reader_sees_every_import():
    """The graph is built from real imports: the attacks import the losses, train imports the defenses."""
    graph = unit_graph()
    assert "losses" in graph["attacks"] and "defenses" in graph["train"] and "experiments" in graph["reproduce"]
