"""The shape of the package: layers that import downward only, workers that import nothing of the main
environment, stages that meet only through their public entry points, no import cycles (lazy and type-checking
imports included), config as a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qreason"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports anywhere in its source (top level,
    inside functions, under TYPE_CHECKING). ``from . import x`` counts as importing the package itself and,
    when ``x`` is a module, that module too. Importing a submodule does not count as importing its parents
    (Python runs their ``__init__`` first, but a parent that imports its child back is not a cycle of
    ours)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target in modules:
                    edges.add(target)
                edges |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_config_is_a_leaf():
    """The config schemas import no stage: only errors, the registry (kinds are validated against it), the
    bounded JSON parser and other schema modules."""
    allowed = {
        "qreason.errors",
        "qreason.registry",
        "qreason.untrusted",
        "qreason.config",
        "qreason.config.schema",
        "qreason.config.judge",
    }
    reached = reachable(import_graph(), "qreason.config.schema") | reachable(
        import_graph(), "qreason.config.judge"
    )
    assert reached <= allowed, f"qreason.config reaches {sorted(reached - allowed)}"


# The layers, lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    (
        "leaves",
        [
            "qreason",
            "qreason.errors",
            "qreason.console",
            "qreason.registry",
            "qreason.records",
            "qreason.summary",
            "qreason.stats",
            "qreason.pool",
            "qreason.flips",
            "qreason.children",
            "qreason.untrusted",
            "qreason.config",
        ],
    ),
    ("store", ["qreason.store"]),
    ("inputs", ["qreason.inputs"]),
    ("engines", ["qreason.engines"]),
    ("workers", ["qreason.workers"]),
    ("stages", ["qreason.stages"]),
    ("report", ["qreason.report"]),
    ("pipeline", ["qreason.pipeline"]),
    # the command line, ``python -m qreason`` and the shim that task files exported by old versions import
    # and the lm-eval task files shipped as package data, which lm-eval loads
    ("cli", ["qreason.cli", "qreason.__main__", "qreason.lm_eval_tasks", "qreason.specs"]),
]
WORKERS = {"qreason.workers.quantize", "qreason.workers.train", "qreason.workers.lm_eval"}


def layer_of(module: str) -> int:
    """The index of a module's layer (the longest matching prefix wins: ``qreason`` itself is a leaf)."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} belongs to no layer: add it to LAYERS"
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" and parts[2] != "base" else None


def private_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    """Stages importing another stage's inner modules (``qreason.stages.judge.stage``) instead of its
    package."""
    out = []
    for m, targets in graph.items():
        if stage_of(m) is None:
            continue
        for t in targets:
            other = stage_of(t)
            if other and other != stage_of(m) and t != f"qreason.stages.{other}":
                out.append(f"{m} imports {t}: use qreason.stages.{other}")
    return sorted(out)


def private_names_across_stages() -> list[str]:
    """``from qreason.stages.X import _name`` from outside stage X."""
    out = []
    for path in PKG.rglob("*.py"):
        mod = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and stage_of(node.module) not in (None, stage_of(mod))
            ):
                out += [f"{mod} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return sorted(out)


def test_the_layer_check_finds_a_planted_upward_import():
    graph = {"qreason.store.table": {"qreason.stages.grade"}, "qreason.stages.grade": {"qreason.store.table"}}
    assert upward_imports(graph) == ["qreason.store.table (store) imports qreason.stages.grade (stages)"]
    assert private_stage_imports({"qreason.stages.recover.stage": {"qreason.stages.judge.stage"}})


def test_layers_import_downward_only():
    problems = upward_imports(import_graph())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_workers_import_only_the_protocol():
    """A worker runs in a side environment (llm-compressor, TRL, lm-eval): of qreason it may import only the
    protocol, which imports nothing of qreason."""
    graph = import_graph()
    bad = {w: sorted(graph[w] - {"qreason.workers.protocol", "qreason.workers", "qreason"}) for w in WORKERS}
    bad["qreason.workers.protocol"] = sorted(
        graph["qreason.workers.protocol"] - {"qreason.workers", "qreason"}
    )
    assert not any(bad.values()), {k: v for k, v in bad.items() if v}


def test_stages_meet_only_through_their_public_entry_points():
    problems = private_stage_imports(import_graph()) + private_names_across_stages()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", ["qreason.registry", "qreason.summary", "qreason.stats", "qreason.flips"])
def test_leaves_import_only_leaves(module):
    reached = reachable(import_graph(), module)
    assert all(layer_of(m) == 0 for m in reached), f"{module} reaches {sorted(reached)}"
