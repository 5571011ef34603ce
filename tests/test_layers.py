"""The package layering (docs/design.md section 4): walk every import with the AST and fail on an import
from a higher layer, on any import cycle, and on a function-local import of certkit's own modules outside
the CLI (the CLI imports a command's library code only when that command runs, so `--help` stays fast)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module may import from its own layer or a lower one
LAYERS = (
    ("base", ("certkit.errors", "certkit._validation", "certkit.io", "certkit.seeding", "certkit.devices",
              "certkit.parallel", "certkit.version", "certkit.progress")),
    ("certify", ("certkit.certify",)),
    ("backdoor", ("certkit.backdoor",)),
    ("purifiers", ("purifiers",)),
    ("runs", ("certkit.runs",)),
    ("top", ("certkit.cli", "certkit.__main__", "certkit")),
)
#: third-party modules that may be imported inside a function (optional or slow to import)
LAZY_THIRD_PARTY = {"dask", "distributed", "matplotlib", "threadpoolctl", "fcntl", "yaml", "PIL", "torchvision",
                    "sklearn", "IPython", "art", "pandas", "scipy", "torch"}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("certkit", "purifiers"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank < 0:
        raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS")
    return rank


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported internal module, line, inside a function) for every import statement of ``name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append((full if full in mods else base, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return out


def _graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    upward, local = [], []
    for name, path in mods.items():
        for target, line, in_function in _imports(name, path, mods):
            internal = target in mods or target.split(".")[0] in ("certkit", "purifiers")
            if not internal:
                top = target.split(".")[0]
                if in_function and top not in LAZY_THIRD_PARTY and top not in sys.stdlib_module_names:
                    local.append(f"{name}:{line} imports {target} inside a function")
                continue
            while target not in mods:  # `import certkit.x.y` where y is an attribute
                target = target.rsplit(".", 1)[0]
            if target == name:
                continue
            graph[name].add(target)
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]}), line {line}")
            if in_function and name != "certkit.cli":
                local.append(f"{name}:{line} imports {target} inside a function")
    return graph, upward, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_belongs_to_a_layer():
    for name in _modules():
        layer_of(name)


def test_no_module_imports_from_a_higher_layer():
    _, upward, _ = _graph()
    assert upward == []


def test_no_import_cycle():
    graph, _, _ = _graph()
    assert _cycles(graph) == []


def test_no_function_local_imports_of_certkit_modules_outside_the_cli():
    _, _, local = _graph()
    assert local == []


def test_the_checker_sees_a_planted_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert layer_of("certkit.runs.rundir") > layer_of("purifiers.base") > layer_of("certkit.backdoor.data")
    assert layer_of("certkit.certify.bounds") > layer_of("certkit.errors")


@pytest.mark.parametrize("module", ["certkit.errors", "certkit.certify.bounds", "certkit.backdoor.data"])
def test_low_layers_load_without_the_layers_above(module):
    import subprocess

    code = (f"import sys, {module}; bad = [m for m in sys.modules if m.startswith(('certkit.runs', "
            f"'purifiers', 'certkit.cli'))]; print(bad); raise SystemExit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_public_name_of_the_facade_resolves():
    import certkit

    for name in certkit.__all__:
        assert getattr(certkit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        certkit.nosuch  # noqa: B018
