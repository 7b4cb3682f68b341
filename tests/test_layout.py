"""The package's shape: no import cycles, docs/design.md's layers true to the imports, a row for every module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mitdenoise"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


DESIGN = PACKAGE.parent / "docs" / "design.md"


def design_layers() -> list[tuple[str, list[str]]]:
    """The layers of docs/design.md's first code block, top first: ``[(name, [module, ...]), ...]``."""
    block = DESIGN.read_text().split("```")[1]
    layers = []
    for line in block.strip().splitlines():
        name, _, modules = line.partition(":")
        layers.append((name.strip(), [m.strip() for m in modules.split(",")]))
    return layers


def test_every_module_is_in_one_layer_of_the_design_and_imports_only_its_own_layer_or_lower():
    graph = import_graph()
    layer_of = {}
    for depth, (_, modules) in enumerate(reversed(design_layers())):
        for short in modules:
            name = "mitdenoise" if short == "mitdenoise" else f"mitdenoise.{short}"
            assert name not in layer_of, f"{short} is in two layers of docs/design.md"
            layer_of[name] = depth
    assert sorted(set(graph) - set(layer_of)) == [], "modules missing from docs/design.md's layers"
    assert sorted(set(layer_of) - set(graph)) == [], "docs/design.md lists modules that do not exist"
    upward = [f"{m} -> {i}" for m, imported in graph.items() for i in imported if layer_of[i] > layer_of[m]]
    assert upward == []


def test_every_module_has_a_row_in_the_design():
    text = DESIGN.read_text()
    paths = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")]
    rows = [p for p in paths if not p.endswith("__init__.py") and not p.endswith("__main__.py")]
    assert [p for p in rows if f"| `{p}` |" not in text] == []


def test_no_module_is_over_700_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}


def test_only_the_command_line_writes_to_the_terminal():
    """The library logs (``logging``) and reports through callbacks; ``cli/`` alone prints."""
    writers = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path).startswith("mitdenoise.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                writers.append(f"{module_name(path)}:{node.lineno} print")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("rich", "typer")):
                writers.append(f"{module_name(path)}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                writers.append(f"{module_name(path)}:{node.lineno} sys.{node.attr}")
    assert writers == []
