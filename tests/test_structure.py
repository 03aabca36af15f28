"""The shape of the library, checked: no import circles (function-local imports included), the layer order,
no module over 400 lines, no block of 6 or more lines copied between modules, no SystemExit below the apps.

Layer order, lowest first (a package may import those below it, never those above):
    shards, routing, incentives    pure: never import swarm (and routing, incentives never torch)
    swarm.wire, swarm.dht          what crosses between peers: never the client, the server or the apps
    swarm.net                      how peers connect: never the client, the server or the apps
    swarm.client | swarm.server    the two sides: never each other, never the apps
    swarm.apps                     what people run
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("swarm", "shards", "routing", "incentives")
MAX_LINES = 400
COPY_LINES = 6

# (importer prefix, forbidden prefixes)
FORBIDDEN = [
    ("shards", ("swarm",)), ("routing", ("swarm", "torch")), ("incentives", ("swarm", "torch")),
    ("swarm.wire", ("swarm.client", "swarm.server", "swarm.apps", "swarm.net")),
    ("swarm.dht", ("swarm.client", "swarm.server", "swarm.apps", "swarm.net")),
    ("swarm.net", ("swarm.client", "swarm.server", "swarm.apps")),
    ("swarm.client", ("swarm.server", "swarm.apps")),
    ("swarm.server", ("swarm.client", "swarm.apps")),
]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module this one imports, at any depth of its code (function-local imports count: they hide
    circles, they do not remove them)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from swarm.wire import compact` imports the module swarm.wire.compact
                child = f"{node.module}.{alias.name}"
                out.add(child if child in known else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = imports(path, known)
        graph[name] = {t for t in targets if t in known and t != name}
        graph[name] |= {t for t in targets if t.split(".")[0] == "torch"}  # for the layer rules only
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, targets in sorted(graph.items()):
        for prefix, forbidden in FORBIDDEN:
            if under(importer, prefix):
                bad += [f"{importer} imports {t}" for t in sorted(targets) if any(under(t, f) for f in forbidden)]
    return bad


_SKIP = re.compile(r"^(#.*|[\])}(\[{:,.]*|import .*|from \S+ import .*|\"\"\".*|.*\"\"\"|pass|else:|try:|finally:"
                   r"|return|continue|break)$")


def significant_lines(path: Path) -> list[tuple[int, str]]:
    """The lines that carry code, white space folded (blank lines, comments, lone punctuation, imports and
    bare keywords are passed over, as copy detectors do)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        folded = " ".join(line.split())
        if folded and not _SKIP.match(folded):
            out.append((number, folded))
    return out


def copies(paths: dict[str, Path], size: int = COPY_LINES) -> list[str]:
    """Runs of ``size`` significant lines that stand, to the letter, in two different modules."""
    places = defaultdict(list)
    for name, path in paths.items():
        lines = significant_lines(path)
        for i in range(len(lines) - size + 1):
            window = tuple(text for _, text in lines[i:i + size])
            places[window].append((name, lines[i][0]))
    found = []
    for window, where in places.items():
        if len({name for name, _ in where}) > 1:
            found.append(" ~ ".join(f"{name}:{line}" for name, line in where))
    return sorted(found)


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_layer_order():
    assert layer_violations(import_graph()) == []


def test_no_module_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in long.items() if n > MAX_LINES} == {}


def test_no_block_copied_between_modules():
    assert copies(modules()) == []


def test_no_module_reads_another_modules_private_names():
    """Neither ``from module import _name`` nor ``module._name`` (a module of the project imported by name)."""
    known, found = modules(), []
    private = lambda n: n.startswith("_") and not n.startswith("__")
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        project_modules = set()  # names this module binds to project modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                found += [f"{name} imports {node.module}.{a.name}" for a in node.names if private(a.name)]
                project_modules |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in known}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id in project_modules:
                found.append(f"{name} reads {node.value.id}.{node.attr}")
    assert found == []


def test_library_code_never_exits_the_process():
    """Only the apps decide that the process ends; a library raises and lets its caller choose."""
    exits = set()
    for name, path in modules().items():
        if under(name, "swarm.apps"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "SystemExit")
            raised = isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc)
            if called or raised:
                exits.add(f"{name}:{node.lineno}")
    assert exits == set()


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks themselves can fail: a planted circle, a planted copy."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_violations({"swarm.wire.requests": {"swarm.server.handler"}}) == \
        ["swarm.wire.requests imports swarm.server.handler"]
    block = "\n".join(f"value_{i} = compute({i}, weight={i * 2})" for i in range(6))
    (tmp_path / "one.py").write_text(f"x = 1\n{block}\n")
    (tmp_path / "two.py").write_text(f"def f():\n    pass\n{block}\n")
    assert copies({"one": tmp_path / "one.py", "two": tmp_path / "two.py"}) == ["one:2 ~ two:3"]
