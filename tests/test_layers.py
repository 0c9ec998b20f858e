"""The package's imports run one way: every ``ncl_hub`` module imports only from its own layer or the layers below it
(counting imports inside functions too), no two modules import each other even indirectly, nothing imports a private
name of another module or of timm, and an import inside a function is a commented lazy import (a handful at most).

The layers, from the one that knows least (a module's layer is that of its longest listed prefix):
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "ncl_hub"
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("ncl_hub.version", "ncl_hub.errors", "ncl_hub.files", "ncl_hub.labels", "ncl_hub.seeding"),  # utilities
    ("ncl_hub.cli", "ncl_hub.config"),  # configuration
    ("ncl_hub.priors", "ncl_hub.calibration", "ncl_hub.losses", "ncl_hub.baselines", "ncl_hub.models"),
    ("ncl_hub.data",),
    ("ncl_hub.evaluate",),
    ("ncl_hub.hub",),
    ("ncl_hub.training", "ncl_hub.apps"),  # what runs the library: training, evaluating a saved run
    ("ncl_hub",),  # the package root: registers the models, re-exports the public names
)
MAX_LAZY = 5
__doc__ += "\n".join(f"    {i}. {', '.join(names)}" for i, names in enumerate(LAYERS))


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
    return rank


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: Dict[str, Path]):
    """(module, line, imported ncl_hub module or timm module, imported name or None, inside a function, source line)"""
    for module, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function: Set[int] = {sub.lineno for node in ast.walk(tree)
                                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                 for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path.name == "__init__.py", node)
                targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, a.name) for a in node.names]
            else:
                continue
            context = " ".join(lines[max(0, node.lineno - 2):node.end_lineno])
            for target, name in targets:
                yield module, node.lineno, target, name, node.lineno in in_function, context


def _resolve(target: str, mods: Dict[str, Path]) -> str:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target


def test_imports_run_down_the_layers_only():
    mods = _modules()
    upward = []
    for module, line, target, _, _, _ in _imports(mods):
        target = _resolve(target, mods)
        if target.startswith("ncl_hub") and target != module and _layer(target) > _layer(module):
            upward.append(f"{module}:{line} imports {target} (layer {_layer(target)} > {_layer(module)})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    mods = _modules()
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for module, _, target, _, _, _ in _imports(mods):
        target = _resolve(target, mods)
        if target.startswith("ncl_hub") and target != module:
            edges[module].add(target)
    circles: List[List[str]] = []
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(mods):
        if module not in state:
            visit(module, [module])
    # the package root imports its subpackages, which Python imports through the root: not a circle of the code
    circles = [c for c in circles if "ncl_hub" not in c]
    assert not circles, "import circles: " + " | ".join(" -> ".join(c) for c in circles)


def test_no_private_imports_across_modules():
    mods = _modules()
    private = []
    for module, line, target, name, _, _ in _imports(mods):
        from_timm_private = target.startswith("timm.") and any(p.startswith("_") for p in target.split(".")[1:])
        other_module = _resolve(target, mods) != module
        if from_timm_private or (name and name.startswith("_") and not name.startswith("__") and other_module
                                 and (target.startswith("ncl_hub") or target.startswith("timm"))):
            private.append(f"{module}:{line} {target}.{name}")
    assert not private, "private imports: " + ", ".join(private)


def test_lazy_imports_are_few_and_say_why():
    mods = _modules()
    lazy = [(module, line, target, context) for module, line, target, _, inside, context in _imports(mods)
            if inside and _resolve(target, mods).startswith("ncl_hub")]
    assert len(lazy) <= MAX_LAZY, f"{len(lazy)} ncl_hub imports inside functions: " + ", ".join(
        f"{m}:{line}" for m, line, _, _ in lazy)
    silent = [f"{m}:{line}" for m, line, _, context in lazy if "#" not in context]
    assert not silent, "lazy imports without a comment saying why: " + ", ".join(silent)


def test_the_layer_test_sees_every_import():
    """The checker itself: a module importing upward, inside a function, is found (no silent pass)."""
    mods = _modules()
    found = {(m, t) for m, _, t, _, _, _ in _imports(mods)}
    assert ("ncl_hub.training.loop", "ncl_hub.evaluate") in found
    assert _layer("ncl_hub.data.tensor.cache") == _layer("ncl_hub.data") > _layer("ncl_hub.models.ncl")
