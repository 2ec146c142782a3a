"""The package's shape, read from its import graph: no cycle between packages, nothing below importing anything
above, no private name imported across packages, and modules of one idea each."""

from __future__ import annotations

import ast
from pathlib import Path

import functionalnetworkssft

PACKAGE = Path(functionalnetworkssft.__file__).parent
ROOT = "functionalnetworkssft"
# The ground floor: what every stage may use and which uses no stage.
FOUNDATION = {"errors", "paths", "records", "options", "weights", "outputs", "checkpoints", "distributed",
              "verification", "hub_code", "chat_rendering"}
# The command line sits on top: only the entry points import it.
TOP = {"cli", "fnsft_trainer", "__main__"}
# Modules over the size limit that still hold one idea, and why.
ONE_IDEA = {
    "training/config.py": "the declaration of every `fnsft train` flag with its help text, and the rules that tie them",
    "merge/stream_verify.py": "streaming verification: one layer at a time, each leaf loading its own tensors",
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted name (without the root) -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file, at any depth (lazy ones too)."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                module = ".".join([ROOT, *base, *([module] if module else [])])
            found += [(module, alias.name) for alias in node.names]
    return found


def top_part(dotted: str) -> str:
    return dotted.split(".")[0]


def edges() -> list[tuple[str, str, str, str | None]]:
    """(importing module, its package, imported package, imported name) for imports inside the project."""
    found = []
    known = modules()
    for name, path in known.items():
        if not name:
            continue  # the root __init__ is the Python API's facade, which names everything lazily
        for module, imported in imports(path, name):
            if module != ROOT and not module.startswith(ROOT + "."):
                continue
            inner = module[len(ROOT) + 1:]
            if not inner and imported is not None:  # `from functionalnetworkssft import data`
                inner = imported if imported in {top_part(k) for k in known if k} else ""
                imported = None if inner else imported
            if inner:
                found.append((name, top_part(name), top_part(inner), imported))
    return found


def test_packages_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for _, source, target, _ in edges():
        if source != target:
            graph.setdefault(source, set()).add(target)
    order, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        state[node] = "done"
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    assert "training" in order and order.index("data") < order.index("training")


def test_nothing_below_imports_anything_above():
    upward = [f"{name} imports {target}" for name, source, target, _ in edges()
              if (source in FOUNDATION and target not in FOUNDATION and target != source)
              or (target in TOP and source not in TOP)]
    assert upward == []


def test_no_private_name_is_imported_from_another_package():
    crossing = [f"{name} imports {imported} from {target}" for name, source, target, imported in edges()
                if imported and imported.startswith("_") and source != target]
    assert crossing == []


def test_every_module_holds_one_idea_within_the_size_limit():
    oversized = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
                 for path in modules().values()}
    oversized = {name: lines for name, lines in oversized.items() if lines > MAX_LINES and name not in ONE_IDEA}
    assert oversized == {}
    assert all((PACKAGE / name).is_file() for name in ONE_IDEA), "an exempted module no longer exists"


def test_every_stage_is_a_package_with_its_command_beside_its_config():
    for stage in ("data", "training", "merge", "export", "hub", "networks", "options"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    for stage in ("training", "merge", "export", "hub", "networks"):
        assert (PACKAGE / stage / "command.py").is_file(), stage
    assert not (PACKAGE / "config.py").exists() and not (PACKAGE / "data.py").exists()
