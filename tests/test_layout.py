"""The package's shape: no import cycles, and the arrows of docs/design.md point one way."""

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


def test_the_library_does_not_import_the_command_line_and_the_network_not_the_tools_above_it():
    graph = import_graph()
    for module, imported in graph.items():
        if not module.startswith("mitdenoise.cli"):
            assert not any(m.startswith("mitdenoise.cli") for m in imported), module
    lower = ("mitdenoise.model", "mitdenoise.route_cpu", "mitdenoise.route_fused", "mitdenoise.triton_block",
             "mitdenoise.windows", "mitdenoise.masking", "mitdenoise.tiling", "mitdenoise.imageio",
             "mitdenoise.checkpoints", "mitdenoise.registry", "mitdenoise.denoiser")
    upper = ("mitdenoise.bench", "mitdenoise.train", "mitdenoise.cli")
    for module in lower:
        assert not any(m.startswith(upper) for m in graph[module]), module


def test_no_module_is_over_700_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert long == {}
