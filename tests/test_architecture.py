"""The import graph (issue 17 item 2): no circles, and layers that only point down.

Every `import` and `from ... import` in the project's packages counts, at module top or inside a
function (a lazy import is still a dependency: the code path needs the module), read with the standard
library's ast. The rules:
- no two modules import each other, directly or round a longer circle;
- the appliance never needs the optimiser or the training code (a Jetson in the field has neither NNCF
  nor torch): nothing reachable from an appliance module is in `optimize` or `models.train`, except
  through the one CLI entry into each (appliance.cli.optimize_cmd -> optimize.cli, appliance.cli.models_cmd
  -> models.cli), and the appliance reaches into models/ only there and to the phantom generators;
- nothing below the CLI imports the appliance's CLI (models/*, optimize/*);
- the on-box optimiser needs no training code: nothing reachable from `optimize` is in `models.train`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "optimize", "models", "firmware_config")  # folders at the top of the repository
NAMESPACE = "edgescreen"  # ... installed as edgescreen.<folder> (setup.py): the import names are the project's own
# The one way from the appliance into each tool tree, and the module it lands on.
ENTRIES = {("edgescreen.appliance.cli.optimize_cmd", "edgescreen.optimize.cli"), ("edgescreen.appliance.cli.models_cmd", "edgescreen.models.cli")}
APPLIANCE_MAY_USE = ("edgescreen.models.phantom",)  # demo, phantom and selftest write phantom studies


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([NAMESPACE, *parts])] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name imported from a package that is itself a module,
    `from appliance.pipeline import accepts`, counts as that module)."""
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(r for a in node.names if (r := _resolve(a.name, mods)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in mods else _resolve(base, mods)
                    if target:
                        out.add(target)
        out.discard(mod)
        edges[mod] = out
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def reachable(edges: dict[str, set[str]], start: Iterable[str], cut: set[tuple[str, str]] = frozenset()) -> dict[str, str]:
    """module -> the module that first imported it, for everything `start` reaches (not across `cut` edges)."""
    seen = {m: m for m in start}
    todo = list(seen)
    while todo:
        mod = todo.pop()
        for nxt in edges.get(mod, ()):
            if (mod, nxt) not in cut and nxt not in seen:
                seen[nxt] = mod
                todo.append(nxt)
    return seen


def _chain(via: dict[str, str], mod: str) -> str:
    chain = [mod]
    while via[chain[-1]] != chain[-1]:
        chain.append(via[chain[-1]])
    return " <- ".join(chain)


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_architecture_no_import_circles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_architecture_the_appliance_needs_no_optimiser_or_training_code(graph: dict[str, set[str]]) -> None:
    appliance = [m for m in graph if _under(m, "edgescreen.appliance")]
    via = reachable(graph, appliance, cut=ENTRIES)
    upward = [_chain(via, m) for m in via if _under(m, "edgescreen.optimize") or _under(m, "edgescreen.models.train")]
    assert upward == [], "the appliance reaches the optimiser or the training code:\n" + "\n".join(upward)


def test_architecture_the_appliance_enters_the_tool_trees_once(graph: dict[str, set[str]]) -> None:
    crossings = {(m, t) for m in graph if _under(m, "edgescreen.appliance") for t in graph[m]
                 if (_under(t, "edgescreen.optimize") or _under(t, "edgescreen.models"))
                 and not any(_under(t, allowed) for allowed in APPLIANCE_MAY_USE)}
    assert crossings == ENTRIES


def test_architecture_nothing_below_imports_the_cli(graph: dict[str, set[str]]) -> None:
    offenders = sorted(f"{m} -> {t}" for m in graph if not _under(m, "edgescreen.appliance") for t in graph[m]
                       if _under(t, "edgescreen.appliance.cli"))
    assert offenders == []


def test_architecture_the_optimiser_needs_no_training_code(graph: dict[str, set[str]]) -> None:
    via = reachable(graph, [m for m in graph if _under(m, "edgescreen.optimize")])
    training = [_chain(via, m) for m in via if _under(m, "edgescreen.models.train")]
    assert training == [], "the on-box optimiser reaches the training code:\n" + "\n".join(training)


def test_architecture_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The rules above are only as good as the graph: a made-up circle and a made-up upward path are found."""
    edges = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "edgescreen.appliance.p": {"edgescreen.appliance.q"},
             "edgescreen.appliance.q": {"edgescreen.models.train.t"}, "edgescreen.models.train.t": set()}
    assert cycles(edges) == [["a.x", "a.y", "a.z"]]
    via = reachable(edges, ["edgescreen.appliance.p"])
    assert _chain(via, "edgescreen.models.train.t") == ("edgescreen.models.train.t <- edgescreen.appliance.q "
                                                        "<- edgescreen.appliance.p")
    graph = import_graph()
    assert "edgescreen.appliance.pipeline.accepts" in graph["edgescreen.appliance.dicom.assembly"]  # `from pkg import module`
    assert "edgescreen.models.cli" in graph["edgescreen.appliance.cli.models_cmd"]


def _old_top_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    return found


def test_architecture_imports_use_the_installed_names_only() -> None:
    """Code, tests and benches import edgescreen.<folder>, never the bare folder: run from the repository root a
    bare `import appliance` would still work and load a second copy of every module beside the installed one."""
    files = [p for d in (*PACKAGES, "tests", "bench") for p in (REPO / d).rglob("*.py")]
    offenders = [hit for path in files for hit in _old_top_level_imports(path)]
    assert offenders == [], "\n".join(offenders[:20])

