"""The package's import structure, read from the source (every import, also those inside
functions): no module of lam_embed imports itself back through others, and the delta-rule
ops import nothing from the layers or the model (as flash-linear-attention's ops)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lam_embed"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lam_embed modules that ``path`` imports (a package means its __init__)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import name": name may be a module of pkg, or something defined in pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.c -> a.b -> a: the nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def test_the_graph_reader_sees_imports_inside_functions():
    graph = import_graph()
    assert "lam_embed.ops.triton" in graph["lam_embed.backends"]  # in load_triton()
    assert "lam_embed.ops.triton.delta_rule" in graph["lam_embed.ops.triton.layer"]


def test_ops_import_nothing_outside_ops():
    outside = {m: sorted(t for t in targets if not t.startswith("lam_embed.ops"))
               for m, targets in import_graph().items() if m.startswith("lam_embed.ops")}
    assert {m: t for m, t in outside.items() if t} == {}


def test_no_import_cycles_below_the_package_init():
    # The package __init__ imports its public modules; no module imports it back.
    graph = {m: {t for t in targets if t != "lam_embed"} for m, targets in import_graph().items()}
    cycles = []

    def visit(module, path):
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif len(path) < len(graph):
                visit(target, path + [target])

    for module in graph:
        if module != "lam_embed":
            visit(module, [module])
    assert cycles == []
