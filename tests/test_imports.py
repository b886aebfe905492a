"""The package's imports: no cycle between modules or between folders, and folders only import the
layers below them. Every import counts: at the top of a file, inside a function, through importlib,
or as a dotted module name in a string."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vcu128"
# The pipeline's layers, lowest first: a module may import its own folder and the folders before it.
LAYERS = ["io", "format", "board", "quant", "check", "export", "demo"]
MODULE_NAME = re.compile(r"\bvcu128(?:\.[a-z_][a-z0-9_]*)+")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """Every vcu128 module `path` names, resolved to a module (`from a.b import c` counts c when
    a.b.c is a module, else a.b)."""
    found = set()
    tree = ast.parse(path.read_text())
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = MODULE_NAME.findall(node.value)
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n.startswith("vcu128") and n != module_name(path, root):
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i in imports_of(p, known) if i != "vcu128"} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_folders_import_only_the_layers_below():
    bad = []
    for m, deps in graph().items():
        f = folder(m)
        for d in deps:
            g = folder(d)
            if f and g and LAYERS.index(g) > LAYERS.index(f):
                bad.append(f"{m} imports {d}")
    assert not bad, "imports that go up a layer: " + "; ".join(sorted(bad))


def test_every_module_lives_in_a_layer():
    loose = [m for m in modules() if m != "vcu128" and folder(m) is None]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_the_checker_finds_cycles_and_hidden_imports(tmp_path):
    """The tests above can fail: a planted cycle is found, and so are imports inside a function,
    relative ones, through importlib and by string."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    src = tmp_path / "vcu128" / "io" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("import importlib\n\ndef f():\n    from ..check import verify\n    from ..format.layout import port_file\n"
                   "    importlib.import_module('vcu128.export.hardware')\n")
    known = {"vcu128", "vcu128.io", "vcu128.io.x", "vcu128.check", "vcu128.check.verify", "vcu128.export",
             "vcu128.export.hardware", "vcu128.format", "vcu128.format.layout"}
    assert imports_of(src, known, tmp_path) == {"vcu128.check.verify", "vcu128.format.layout", "vcu128.export.hardware"}
