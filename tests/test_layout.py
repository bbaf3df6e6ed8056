"""The tree's architecture, checked: no two product files import each other (directly or round a
circle, module level or inside functions), and imports only go down the layers that
ARCHITECTURE.md and each package's __init__ docstring state.

Reads the source with ast (nothing is imported), so it runs in a fraction of a second."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("schemas", "pipeline", "jobs", "model_training", "experiments", "bench", "scripts", "catcurate")

# package prefix -> prefixes it must never import (a lower layer never reaches up)
FORBIDDEN = {
    "schemas": ("pipeline", "jobs", "model_training", "experiments", "bench", "catcurate"),
    "pipeline.store": ("pipeline.media", "pipeline.filter", "pipeline.distill", "jobs", "model_training",
                       "experiments", "bench", "catcurate"),
    "pipeline.media": ("pipeline.filter", "pipeline.distill", "jobs", "model_training", "experiments", "bench",
                       "catcurate"),
    "pipeline.filter": ("pipeline.distill", "jobs", "model_training", "experiments", "bench", "catcurate"),
    "pipeline.distill": ("pipeline.filter", "jobs", "model_training", "experiments", "bench", "catcurate"),
    "jobs": ("model_training", "experiments", "bench", "catcurate"),
    "model_training": ("jobs", "experiments", "bench", "catcurate"),
    "experiments": ("bench", "catcurate"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    mods = {}
    for top in PRODUCT:
        base = ROOT / top
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            mods[_module_name(path)] = path
    return mods


def imports_of(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """Product modules that `path` imports anywhere in it (module level, functions, try blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in mods:   # `from pkg import name`: a submodule, else the package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = product_modules()
    assert "pipeline.store.storage" in mods and "jobs.cat_filter" in mods, "product layout not found"
    # a package's __init__ is not an edge target for its own members (importing pipeline.x runs
    # pipeline/__init__, which imports nothing of the product)
    return {name: imports_of(path, name, mods) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles(graph):
    cycles = _cycles(graph)
    assert not cycles, "files that import each other (directly or round a circle): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_imports_only_go_down(graph):
    bad = []
    for mod, targets in graph.items():
        rules = [v for k, v in FORBIDDEN.items() if mod == k or mod.startswith(k + ".")]
        for target in targets:
            for forbidden in (f for rule in rules for f in rule):
                if target == forbidden or target.startswith(forbidden + "."):
                    bad.append(f"{mod} imports {target}")
        if not mod.startswith("tests") and any(t == "tests" or t.startswith("tests.") for t in targets):
            bad.append(f"{mod} imports the test suite")
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_cycles_and_upward_imports():
    """The checker itself: a planted circle and a planted upward import are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    mods = {"pipeline.store.storage": ROOT, "pipeline.filter.report": ROOT, "pipeline.filter": ROOT}
    tree = "def f():\n    from pipeline.filter import report\n"
    tmp = ROOT / "tests" / ".layout_probe.py"
    try:
        tmp.write_text(tree)
        assert imports_of(tmp, "pipeline.store.storage", mods) == {"pipeline.filter.report", "pipeline.filter"}
    finally:
        tmp.unlink(missing_ok=True)


def test_each_package_says_what_it_owns():
    for pkg in ("pipeline", "pipeline/store", "pipeline/media", "pipeline/filter", "pipeline/distill"):
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc and ("import" in doc.lower()), f"{pkg}/__init__.py must say what it owns and may import"
