"""The package's import graph, read from the source: no cycle, and every import respects the layer order written in
the README's layout paragraph (the one line of the form `errors` < `files` < ... < `__init__`).

The graph counts every ``import`` and ``from ... import`` of a tuneqdm module, function-local ones included; only
imports under ``if TYPE_CHECKING:`` are left out (they never run). A module belongs to the longest layer name that
prefixes it (``eval/encoders`` before ``eval/``); it may import its own unit and any lower layer, never a higher layer
and never another unit of its own layer (``ptq/``, ``train/`` and ``eval/`` stay independent of each other).
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tuneqdm"
README = ROOT / "README.md"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "tuneqdm").rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every import in the module that can run, function-local ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """tuneqdm module -> the tuneqdm modules it imports (``from pkg import name`` resolved to ``pkg.name`` when that
    is a module, else to ``pkg``), and what importing them runs implicitly: importing ``tuneqdm.a.b`` first runs the
    package ``tuneqdm.a``'s ``__init__``, so the modules that ``__init__`` imports count as imported too (the root
    ``tuneqdm/__init__.py``, the public API that Python runs before any submodule, aside)."""
    mods = modules(root)
    direct = {}
    for name, path in mods.items():
        targets = set()
        for dotted, _ in imported_names(name, path):
            while dotted and dotted not in mods:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                targets.add(dotted)
        direct[name] = targets
    graph = {}
    for name, targets in direct.items():
        implied = set(targets)
        for target in targets:
            package = target.rpartition(".")[0]
            while package.count("."):  # the packages above the target, the root left out
                if not name.startswith(package + ".") and package != name:
                    implied |= {t for t in direct.get(package, ()) if t != name and not t.startswith(name + ".")}
                package = package.rpartition(".")[0]
        graph[name] = implied
    return graph


def readme_layers(readme: Path = README) -> list[list[str]]:
    """The layer line of the README's layout paragraph, lowest first, as lists of dotted unit names."""
    lines = [line for line in readme.read_text().splitlines() if line.startswith("`errors` <")]
    assert len(lines) == 1, "the README's layout paragraph must hold one line `errors` < ... < `__init__`"
    layers = []
    for layer in lines[0].split(" < "):
        units = re.findall(r"`([^`]+)`", layer)
        assert units, f"a layer of the README's layer line names no module: {layer!r}"
        layers.append(["tuneqdm" if u == "__init__" else "tuneqdm." + u.rstrip("/").replace("/", ".") for u in units])
    return layers


def unit_of(module: str, units: list[str]) -> str | None:
    """The longest unit that is ``module`` or a package above it; the root package (``__init__``) is a unit of one
    module, so that a module the README does not place belongs to no unit rather than to the top floor."""
    matches = [u for u in units if module == u or (module.startswith(u + ".") and u != "tuneqdm")]
    return max(matches, key=len) if matches else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layering_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    units = list(level)
    problems = []
    for module, targets in sorted(graph.items()):
        mine = unit_of(module, units)
        for target in sorted(targets):
            theirs = unit_of(target, units)
            if theirs == mine:
                continue
            if level[theirs] > level[mine]:
                problems.append(f"{module} -> {target}: {theirs} is above {mine}")
            elif level[theirs] == level[mine]:
                problems.append(f"{module} -> {target}: {theirs} and {mine} are siblings of one layer")
    return problems


def unplaced_modules(root: Path = ROOT, readme: Path = README) -> list[str]:
    units = [u for layer in readme_layers(readme) for u in layer]
    assert len(units) == len(set(units)), "a module is named twice in the README's layer line"
    assert [u for u in units if not any(m == u or m.startswith(u + ".") for m in modules(root))] == []
    return [m for m in modules(root) if unit_of(m, units) is None]


def test_every_module_is_in_a_readme_layer():
    assert unplaced_modules() == []


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_respect_the_readme_layers():
    assert layering_violations(import_graph(), readme_layers()) == []


def _planted_copy(tmp_path: Path, files: dict[str, str]) -> Path:
    """The package and README copied into ``tmp_path``, with ``files`` (paths under tuneqdm/) added or replaced."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "tuneqdm", ignore=shutil.ignore_patterns("__pycache__", "default_pipeline",
                                                                               "weights"))
    shutil.copy(README, tmp_path / "README.md")
    for rel, text in files.items():
        (tmp_path / "tuneqdm" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tuneqdm" / rel).write_text(text)
    return tmp_path


def test_a_planted_upward_import_an_unknown_package_and_an_init_that_imports_upward_fail(tmp_path):
    """Test the test on a copy of the real package: each planted fault is found, and only it."""
    root = _planted_copy(tmp_path / "up", {"quant/leak.py": "from ..train import loop\n"})
    problems = layering_violations(import_graph(root), readme_layers(root / "README.md"))
    assert "tuneqdm.quant.leak -> tuneqdm.train.loop: tuneqdm.train is above tuneqdm.quant" in problems
    assert all(p.startswith("tuneqdm.quant.leak -> ") for p in problems), problems  # and train/__init__'s imports
    root = _planted_copy(tmp_path / "unknown", {"newpkg/__init__.py": "", "newpkg/thing.py": "X = 1\n"})
    assert unplaced_modules(root, root / "README.md") == ["tuneqdm.newpkg", "tuneqdm.newpkg.thing"]
    # toy/ may import eval/encoders, which is below it; were eval/__init__ to import eval.evaluate (above toy/),
    # that import of eval/encoders would run it: the implicit import is an upward one
    init = (PACKAGE / "eval" / "__init__.py").read_text() + "\nfrom .evaluate import evaluate  # noqa\n"
    root = _planted_copy(tmp_path / "init", {"eval/__init__.py": init,
                                             "toy/probe.py": "from ..eval.encoders import cosine_matrix\n"})
    problems = layering_violations(import_graph(root), readme_layers(root / "README.md"))
    assert problems and all(p.startswith(("tuneqdm.toy.", "tuneqdm.eval.encoders")) or "eval.evaluate" in p
                            for p in problems), problems
    assert any(p.startswith("tuneqdm.toy.") and "tuneqdm.eval.evaluate: tuneqdm.eval is above tuneqdm.toy" in p
               for p in problems), problems


def test_the_checks_catch_a_cycle_and_an_upward_or_sideways_import():
    """The checks are not vacuous: planted edges are found."""
    layers = [["tuneqdm.errors"], ["tuneqdm.quant"], ["tuneqdm.ptq", "tuneqdm.train"]]
    graph = {"tuneqdm.quant.a": {"tuneqdm.quant.b"}, "tuneqdm.quant.b": {"tuneqdm.quant.a"},
             "tuneqdm.errors": {"tuneqdm.ptq.x"}, "tuneqdm.ptq.x": {"tuneqdm.train.y", "tuneqdm.quant.a"}}
    assert find_cycle(graph) == ["tuneqdm.quant.a", "tuneqdm.quant.b", "tuneqdm.quant.a"]
    assert layering_violations(graph, layers) == [
        "tuneqdm.errors -> tuneqdm.ptq.x: tuneqdm.ptq is above tuneqdm.errors",
        "tuneqdm.ptq.x -> tuneqdm.train.y: tuneqdm.train and tuneqdm.ptq are siblings of one layer",
    ]


def test_the_cli_parser_loads_no_heavy_library():
    """The subcommands import diffusers, transformers, accelerate, peft and the toy world's drawing when they run, so
    ``tuneqdm --help`` stays as fast as ``import torch`` allows."""
    heavy = ("diffusers", "transformers", "accelerate", "peft", "PIL.ImageDraw")
    code = ("import sys; from tuneqdm.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("source, expected", [
    ("from ..quant.layers import QuantizedLayer", ["tuneqdm.quant.layers.QuantizedLayer"]),
    ("def f():\n    from . import checkpoint", ["tuneqdm.train.checkpoint"]),
    ("import tuneqdm.errors", ["tuneqdm.errors"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .data import Subject", ["typing.TYPE_CHECKING"]),
])
def test_imports_are_read_with_function_local_ones_and_without_type_checking_ones(tmp_path, source, expected):
    path = tmp_path / "loop.py"
    path.write_text(source)
    assert [name for name, _ in imported_names("tuneqdm.train.loop", path)] == expected


# ---- function length ------------------------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 60  # from the ``def`` line to the last line of the body (docstring and comments included)
LONG_FUNCTIONS = {  # the allowed exceptions, each with why it stays long
    "tuneqdm.toy.world._object_layer": "procedural drawing: one shape program per toy object, read top to bottom",
}


def function_lengths(module: str, source: str) -> dict[str, int]:
    """Dotted name (module, classes, enclosing functions) -> line count of every function in ``source``."""
    found = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[name] = child.end_lineno - child.lineno + 1
                visit(child, name)
            else:
                visit(child, prefix)

    visit(ast.parse(source), module)
    return found


def long_functions() -> dict[str, int]:
    lengths = {}
    for name, path in modules().items():
        lengths.update(function_lengths(name, path.read_text()))
    return {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}


def test_no_function_is_longer_than_60_lines_but_the_named_exceptions():
    """The allow-list stays exact: a new long function fails, and so does an exception that has become short (it
    leaves the list)."""
    assert sorted(long_functions()) == sorted(LONG_FUNCTIONS)


def test_function_lengths_are_read_with_methods_and_nested_functions():
    source = "class A:\n    def f(self):\n        def g():\n            pass\n" + "        x = 1\n" * 60
    assert function_lengths("tuneqdm.m", source) == {"tuneqdm.m.A.f": 63, "tuneqdm.m.A.f.g": 2}


def benchmark_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from M import name`` in a benchmark script, function-local ones included,
    where M is a tuneqdm module or a sibling script (``train_memory``)."""
    siblings = {p.stem for p in path.parent.glob("*.py")}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top == "tuneqdm" or top in siblings:
                out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def test_benchmark_scripts_import_only_names_that_exist():
    """A benchmark runs rarely, so a name renamed in the package (or a sibling script) breaks it silently."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        missing = []
        for path in sorted((ROOT / "benchmarks").glob("*.py")):
            for module, name, line in benchmark_imports(path):
                found = importlib.import_module(module)
                is_submodule = hasattr(found, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
                if not hasattr(found, name) and not is_submodule:
                    missing.append(f"{path.name}:{line} from {module} import {name}")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert missing == []
