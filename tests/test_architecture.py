"""The package's shape: no import cycle, presentation only in cli/, and a control plane without the ML stack.

Read from the source with `ast`: every import counts, also one inside a function, so a cycle cannot
hide behind a lazy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "so8t_deploy"
ML_STACK = {"torch", "numpy", "transformers", "safetensors", "gguf", "llama_cpp", "peft", "sentencepiece"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The so8t_deploy modules `path` imports (a package's `from . import x` names its submodule x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("so8t_deploy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("so8t_deploy"):
                target = node.module
            else:
                continue
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found |= submodules or {target}
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imports_of(path, known) for name, path in known.items()}
    assert sum(map(len, graph.values())) > 100  # the graph really was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def package_of(module: str) -> str:
    """so8t_deploy.bake.maps -> so8t_deploy.bake; a module at the top (so8t_deploy.errors) is its own unit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded into packages: an edge wherever a module of one imports a module of another."""
    packages: dict[str, set[str]] = {package_of(m): set() for m in graph}
    for module, imported in graph.items():
        packages[package_of(module)] |= {package_of(m) for m in imported} - {package_of(module)}
    return packages


def test_the_package_graph_has_no_cycle():
    """Packages layer too: a cycle between two packages (bake -> build -> bake) is a cycle even when no
    module imports itself back, and it is how shared infrastructure ends up inside one of its users."""
    known = modules()
    packages = package_graph({name: imports_of(path, known) for name, path in known.items()})
    assert {"so8t_deploy.bake", "so8t_deploy.build", "so8t_deploy.store", "so8t_deploy.rollout"} <= packages.keys()
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_a_package_cycle_is_found_through_different_modules():
    graph = {"so8t_deploy.bake.bake": {"so8t_deploy.build.hashing"}, "so8t_deploy.build.hashing": set(),
             "so8t_deploy.build.worker": {"so8t_deploy.bake.maps"}, "so8t_deploy.bake.maps": set()}
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["so8t_deploy.bake", "so8t_deploy.build", "so8t_deploy.bake"]


def test_the_store_is_the_base_layer():
    """store/ (workspace, digests, input identity) is what every stage shares: it imports no other package."""
    known = modules()
    for name, path in known.items():
        if package_of(name) == "so8t_deploy.store":
            above = {package_of(m) for m in imports_of(path, known)} - {"so8t_deploy.store"}
            top_level_modules = {m for m in above if (PACKAGE / f"{m.split('.')[-1]}.py").is_file()}
            assert above == top_level_modules, (name, above - top_level_modules)


def test_nothing_below_the_cli_imports_it_or_prints():
    known = modules()
    for name, path in known.items():
        if name.startswith("so8t_deploy.cli") or name == "so8t_deploy.__main__":  # the entry points
            continue
        assert not any(m.startswith("so8t_deploy.cli") for m in imports_of(path, known)), name
        assert "rich" not in {n.split(".")[0] for n in _external_imports(path)}, name
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"{name} prints (line {calls[0].lineno}); report through Progress instead"


def _external_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_the_control_plane_imports_no_ml_stack():
    """Planning, applying and smoke-testing a `backend: docker` manifest must work where torch is not installed:
    importing the commands must not pull the ML stack in."""
    code = ("import sys; import so8t_deploy.cli.app, so8t_deploy.deploy.commands, so8t_deploy.build.runner; "
            f"print(sorted(m for m in {sorted(ML_STACK)!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_imported_distribution_is_declared():
    """A module so8t_deploy imports comes from a distribution pyproject.toml names (the base dependencies or an
    extra), not from whatever happened to be installed beside it."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_normalized(Requirement(r).name) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_normalized(Requirement(r).name) for r in extra}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in PACKAGE.rglob("*.py"):
        for module in _external_imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "so8t_deploy":
                continue
            distributions = {_normalized(d) for d in providers.get(top, [top])}
            if not distributions & declared:
                undeclared[top] = sorted(distributions)
    assert len(declared) > 10  # pyproject.toml really was read
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
