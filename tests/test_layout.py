"""The architecture as a test: which package and which room of pipeline/ may import which.

Every ``import`` in the source counts, also those inside functions (the lazy imports that
keep ``bsgal --help`` fast are imports all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("pipeline", "generators", "annotators", "trainer", "selector")
#: Top-level modules of pipeline/ that every room may use.
SHARED_TOP = {"pipeline.config", "pipeline.paths", "pipeline.errors", "pipeline.demand",
              "pipeline.command_line"}
ROOMS = ("run", "storage", "cluster", "inspection")
#: The two modules that wire the rooms together.
ENTRIES = {"pipeline.cli", "pipeline.run.job"}
#: What each outer package may import of the project (the arrows of docs/architecture.md):
#: packages, or single modules. Four modules are shared on purpose: the batch columns and the
#: one vocabulary of statuses and decision reasons (plain numpy), the hub/folder resolution of
#: model weights (CLIP loads like SD), the backend registry kind that generators and
#: annotators both keep, and the class looks that the built-in data set and the built-in
#: generator both draw.
OUTER = {"generators": set(),
         "annotators": {"generators.columns", "generators.hub", "generators.backends"},
         "selector": set(),
         "trainer": {"selector", "generators.columns", "generators.looks"}}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """The project modules ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {_module_of(m) for m in out if m.split(".")[0] in PACKAGES}


def _module_of(name: str) -> str:
    """The project module that ``name`` (a module or a name inside one) belongs to."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return name


def _room(module: str) -> str | None:
    """``run``/``storage``/``cluster``/``inspection`` for a module of a room, else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in ROOMS else None


MODULES = _modules()


def _shared(module: str, allowed: set[str] | tuple[str, ...] = tuple(SHARED_TOP)) -> bool:
    """Whether ``module`` is one of ``allowed`` or inside one of them (``pipeline.config``
    is a package of three modules)."""
    return any(module == a or module.startswith(f"{a}.") for a in allowed)


def test_the_rooms_exist_and_hold_code() -> None:
    for room in ROOMS:
        assert any(m.startswith(f"pipeline.{room}.") for m in MODULES), room


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipeline.")))
def test_rooms_import_config_and_storage_not_each_other(module: str) -> None:
    if module in ENTRIES:
        return
    own = _room(module)
    for target in _imports(MODULES[module], module):
        if not target.startswith("pipeline.") or target == "pipeline":
            continue
        room = _room(target)
        if room is None and target not in ("pipeline.run", "pipeline.storage",
                                           "pipeline.cluster", "pipeline.inspection"):
            assert _shared(target), f"{module} imports {target}: only the CLI entry may"
        elif room != own:
            assert room == "storage", (f"{module} imports {target}: a room may import "
                                       "config and storage, not another room")
        if own == "storage":
            assert room == "storage" or _shared(target, ("pipeline.config", "pipeline.errors")), (
                f"{module} imports {target}: storage imports config and errors only")


@pytest.mark.parametrize("package", sorted(OUTER))
def test_outer_packages_point_one_way(package: str) -> None:
    for module, path in MODULES.items():
        if module.split(".")[0] != package:
            continue
        for target in _imports(path, module):
            top = target.split(".")[0]
            assert top == package or top in OUTER[package] or target in OUTER[package], (
                f"{module} imports {target}")


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from pipeline.run.graph import STAGES\n"
                      "from .shards import SCHEMA\n")
    found = _imports(source, "pipeline.storage.mod")
    assert "pipeline.run.graph" in found and "pipeline.storage.shards" in found


def test_every_cited_document_is_in_the_repo() -> None:
    import re

    cited = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
    sources = [p for folder in (*PACKAGES, "benchmarks", "tests", "configs", "deploy")
               for p in (REPO_ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md")]
    missing = {f"{p.relative_to(REPO_ROOT)}: {name}" for p in sources
               for name in cited.findall(p.read_text())
               if not (REPO_ROOT / name).is_file() and not (p.parent / name).is_file()}
    assert not missing, sorted(missing)


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_no_import_cycle_anywhere_in_the_tree() -> None:
    graph = {m: {t for t in _imports(p, m) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    assert _import_cycles(graph) == []


def test_the_cycle_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _import_cycles(graph) == [["a", "b", "c"]]
