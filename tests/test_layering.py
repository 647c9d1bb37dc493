"""The import graph: no cycles, and no module imports one from a higher layer (lazy imports count)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnpatch"

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = [
    ("attnpatch.options", "attnpatch.sparsity", "attnpatch.adapters"),
    ("attnpatch.registry", "attnpatch.backends", "attnpatch.cache", "attnpatch.profile", "attnpatch.probe",
     "attnpatch.stats", "attnpatch.estimators"),
    ("attnpatch.masking", "attnpatch.methods"),
    ("attnpatch.dispatch", "attnpatch.spec"),
    ("attnpatch.api",),
    ("attnpatch.testing", "attnpatch.models", "attnpatch.eval", "attnpatch.calibrate", "attnpatch.bench",
     "attnpatch.demo", "attnpatch.cli"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.with_suffix("").relative_to(PACKAGE.parent)
        out[".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)] = f
    return out


def _imports(name: str, path: Path, modules) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "attnpatch":
                found.add(t)
    return found


def _layer(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if name == "attnpatch":  # the package's face re-exports the API
            continue
        for target in _imports(name, path, modules):
            if _layer(target) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items() if m != "attnpatch"}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph.get(m, ()):
            if t in stack[:-1] and t.startswith(m + "."):  # a package's __init__ re-exporting its own modules
                continue
            if state.get(t) == 1 and not m.startswith(t + "."):
                raise AssertionError(" -> ".join([*stack, t]))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
