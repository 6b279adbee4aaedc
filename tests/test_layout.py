"""The shape of the code: import names mirror folders, arrows go one way, no import loops, no oversized files.

Read from the source with ``ast`` (every import, also those inside functions): core (``compress``) never imports the
export targets (``exporters``), the CLI (``cli``, ``cli_commands``) or ``benchmarks``; exporters never import the CLI; the
commands beside ``cli.py`` never import it (it imports them); benchmarks use
only compress's public names (nothing starting with ``_``); and no module reaches itself through its imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PARTS = {"compress": ROOT / "compress", "exporters": ROOT / "exporters", "cli": ROOT / "cli.py", "cli_commands": ROOT / "cli_commands",
         "benchmarks": ROOT / "benchmarks"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Module name -> file, for every Python file of the parts (a package's __init__ is the package's name)."""
    out = {}
    for name, where in PARTS.items():
        files = [where] if where.is_file() else sorted(where.rglob("*.py"))
        for f in files:
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _edges() -> dict[str, set[tuple[str, int]]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for module, names, line in _imports(name, path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if len(targets) < len(names) or not names:     # names that are attributes of the module itself
                targets.append(module)
            for t in targets:
                # the innermost project module that holds the target (compress.methods.x.y -> compress.methods.x)
                while t and t not in MODULES:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges[name].add((t, line))
    return edges


EDGES = _edges()


def _part(module: str) -> str:
    return module.split(".")[0]


def test_the_parts_are_where_the_layout_says():
    assert not (ROOT / "compress" / "cli.py").exists() and not any(p.is_symlink() for p in ROOT.joinpath("compress").rglob("*"))
    assert {"cli", "compress", "compress.methods", "exporters", "exporters.onnx", "benchmarks.harness"} <= set(MODULES)


@pytest.mark.parametrize("source, forbidden", [("compress", ("exporters", "cli", "cli_commands", "benchmarks")),
                                               ("exporters", ("cli", "cli_commands", "benchmarks")), ("cli_commands", ("cli", "benchmarks"))])
def test_arrows_go_one_way(source, forbidden):
    wrong = sorted(f"{m}:{line} imports {t}" for m, ts in EDGES.items() if _part(m) == source
                   for t, line in ts if _part(t) in forbidden)
    assert not wrong, "\n".join(wrong)


def test_no_import_loops():
    """Tarjan's strongly connected components over the module graph: every component must be a single module."""
    graph = {m: sorted({t for t, _ in ts}) for m, ts in EDGES.items()}
    index, low, stack, on, loops, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    detail = []
    for comp in loops:
        inside = set(comp)
        detail.append(" <-> ".join(comp) + ": " + "; ".join(f"{m}:{line} -> {t}" for m in comp for t, line in sorted(EDGES[m]) if t in inside))
    assert not loops, "\n".join(detail)


def test_benchmarks_use_only_public_names():
    private = []
    for name, path in MODULES.items():
        if _part(name) != "benchmarks":
            continue
        for module, names, line in _imports(name, path):
            if _part(module) == "compress":
                private += [f"{name}:{line} {module}.{n}" for n in names if n.startswith("_")]
                private += [f"{name}:{line} {module}" for part in module.split(".") if part.startswith("_") and part != "__init__"]
    assert not private, "\n".join(private)


def test_no_file_is_oversized():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines (each holds more than one job): {big}"


def test_the_graph_sees_what_it_should():
    """The checks above can fail: the scan finds a known edge, a relative import and a lazy import inside a function."""
    assert ("compress.errors", 15) in {(t, line) for t, line in EDGES["compress.registry"]} or \
        any(t == "compress.errors" for t, _ in EDGES["compress.registry"])
    assert any(t == "compress.runners" for t, _ in EDGES["exporters.onnx"])
    assert any(t == "compress.pipeline" for t, _ in EDGES["cli"])


def test_no_public_verb_is_shadowed_by_a_module():
    """``compress.bench(...)`` must stay the verb: importing a submodule of the same name would replace it."""
    import compress

    clash = [n for n in compress.__all__ if (ROOT / "compress" / f"{n}.py").exists() or (ROOT / "compress" / n).is_dir()]
    assert not clash, f"modules named like public verbs: {clash}"


def test_a_main_block_comes_last():
    """``python -m cli`` runs the ``if __name__ == "__main__":`` block as it reaches it: a function defined below it does
    not exist yet (a NameError once broke every ``python -m cli`` error path this way)."""
    late = []
    for path in sorted([ROOT / "cli.py", *(ROOT / "compress").rglob("*.py"), *(ROOT / "cli_commands").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "exporters").rglob("*.py")]):
        body = ast.parse(path.read_text()).body
        for i, node in enumerate(body):
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and i != len(body) - 1:
                late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not late, f"statements follow the __main__ block in {late}"
