"""Architectural rules of the package, read from its source with `ast` (amd_fast/ and kernels/, installed as
amd_fast.kernels).

1. Parallelism is applied from outside: only amd_fast/engine.py imports deepspeed or torch.distributed. The one other
   module that touches DeepSpeed is amd_fast/checkpoint.py, which reads its checkpoint files (zero_to_fp32, no process
   group), inside functions only. Model, objective, data and kernel code stays free of it.
2. The import graph has no cycle, and the loop (amd_fast/trainer.py) imports no task.
3. Every checkpoint read goes through amd_fast/checkpoint.py (`read_checkpoint`: records checked, DeepSpeed
   directories consolidated)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amd_fast"
OWNER = PACKAGE / "engine.py"
READER = PACKAGE / "checkpoint.py"  # reads DeepSpeed's checkpoint directories
FORBIDDEN = ("deepspeed", "torch.distributed")


def _names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "torch":  # `from torch import distributed`
                names += [f"torch.{a.name}" for a in node.names]
    return names


def _imports(path: Path) -> list[str]:
    return _names(ast.parse(path.read_text(), str(path)))


def _imports_in_functions(path: Path) -> list[str]:
    """The imports that run when a function is called, not when the module is imported."""
    tree = ast.parse(path.read_text(), str(path))
    return [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in _names(f)]


def _forbidden(names: list[str]) -> list[str]:
    return [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]


def test_only_the_engine_imports_deepspeed_or_torch_distributed():
    offenders = {
        str(p.relative_to(ROOT)): name
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
        if p not in (OWNER, READER)
        for name in _forbidden(_imports(p))
    }
    assert not offenders, f"only amd_fast/engine.py may import {FORBIDDEN}; found {offenders}"


def test_the_checkpoint_reader_imports_deepspeed_only_inside_functions_and_never_torch_distributed():
    found = _forbidden(_imports(READER))
    assert all(n.startswith("deepspeed") for n in found), found
    assert sorted(found) == sorted(_forbidden(_imports_in_functions(READER))), "a module-level deepspeed import"


def test_the_engine_module_is_the_one_that_does():
    assert any(n.startswith("deepspeed") for n in _imports(OWNER))
    assert "torch.distributed" in _imports(OWNER)


# ---------------------------------------------------------------------------------------------------------------
# The package's import graph has no cycle: a generic module never imports its specific users (the loop its tasks, a
# checkpoint reader the engine that reads through it); the entry points pass the specific thing in.

KERNELS = ROOT / "kernels"  # installed as amd_fast.kernels
LOOP = "amd_fast.trainer"
TASKS = ("amd_fast.pretraining", "amd_fast.finetune")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for base, name in ((PACKAGE, "amd_fast"), (KERNELS, "amd_fast.kernels")):
        for p in base.rglob("*.py"):
            parts = [name, *p.relative_to(base).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def _bound_names(path: Path) -> set[str]:
    """The names a package's __init__.py binds at its top level (what `from package import name` may take from it)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _from_target(base: str, name: str, modules, bound) -> str:
    sub = f"{base}.{name}"
    if sub in modules or name not in bound.get(base, {name}):  # a non-package module binds every name it gives
        return sub  # a compiled submodule is no key of `modules`: no edge
    return base


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {module of the package it imports: the first line that does}, imports inside functions included.

    `from a import b` is an edge to the submodule `a.b` when there is one, else to `a` when it binds `b` (a package's
    __init__.py, or any module), else none: `b` is a compiled extension (kernels/_native, built or not), which
    imports nothing of ours. Relative imports are resolved."""
    modules = _modules()
    bound = {n: _bound_names(p) for n, p in modules.items() if p.name == "__init__.py"}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = edges = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [_from_target(base, a.name, modules, bound) for a in node.names]
            else:
                continue
            for t in targets:
                if t in modules and t != name:
                    edges.setdefault(t, node.lineno)
    return graph


def _shortest_path(graph, start: str, goal: str) -> list[str] | None:
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == goal:
            return path
        for nxt in sorted(graph[path[-1]]):
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def _cycles(graph) -> list[list[str]]:
    """For every import that lies on a cycle, the shortest way back to its module; each cycle listed once."""
    found = {}
    for a in sorted(graph):
        for b in sorted(graph[a]):
            back = _shortest_path(graph, b, a)
            if back is not None:
                cycle = [a, *back[:-1]]
                i = cycle.index(min(cycle))
                found.setdefault(tuple(cycle[i:] + cycle[:i]), None)
    return [list(c) for c in found]


def _show(graph, cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    return " -> ".join([*steps, cycle[0]])


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    listing = "\n".join(_show(graph, c) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycles in amd_fast/ (each import at its line):\n{listing}"


def test_the_loop_imports_no_task():
    graph = _import_graph()
    assert not set(graph[LOOP]) & set(TASKS), f"{LOOP} imports {sorted(set(graph[LOOP]) & set(TASKS))}"


def test_the_import_graph_reads_every_kind_of_import():
    """The reader itself: relative, `from amd_fast.x import y`, lazy and kernels/ imports all give edges."""
    graph = _import_graph()
    assert "amd_fast.data.transforms" in graph["amd_fast.data.fashion_mnist"]  # from .transforms import ...
    assert "amd_fast.kernels.backend" in graph["amd_fast.kernels.gather"]  # from amd_fast.kernels import backend
    assert "amd_fast.kernels" in graph["amd_fast.ops"]  # from amd_fast import kernels
    assert "amd_fast.report" in graph["amd_fast.pretraining"]  # inside a method
    assert "amd_fast.kernels.gather" in graph["amd_fast.kernels"]  # from amd_fast.kernels.gather import ...
    assert "amd_fast.kernels" not in graph["amd_fast.kernels.backend"]  # from amd_fast.kernels import _native (.so)


# ---------------------------------------------------------------------------------------------------------------
# One reader of checkpoints: torch.load only in checkpoint_io.torch_load (weights_only, the unsafe-pickle switch),
# torch_load only from amd_fast/checkpoint.py, and the weights loaders fed what `read_checkpoint` returns.

LOW_READER = PACKAGE / "models" / "checkpoint_io.py"
LOADERS = ("load_encoder", "load_pretrain", "load_classifier")


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func).rpartition(".")[2], node.lineno


def test_every_checkpoint_read_goes_through_the_checkpoint_module():
    offenders = []
    for p in [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]:
        where = str(p.relative_to(ROOT))
        for node, name, line in _calls(p):
            if name == "load" and ast.unparse(node.func) == "torch.load" and p != LOW_READER:
                offenders.append(f"{where}:{line}: torch.load (read files with checkpoint.read_checkpoint)")
            elif name == "torch_load" and p not in (LOW_READER, READER):
                offenders.append(f"{where}:{line}: torch_load (read files with checkpoint.read_checkpoint)")
            elif name in LOADERS and PACKAGE / "models" not in p.parents:
                src = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(src, ast.Call) and ast.unparse(src.func).endswith("read_checkpoint")):
                    offenders.append(f"{where}:{line}: {name} given {ast.unparse(src) if src else '?'}, not "
                                     "checkpoint.read_checkpoint(...)")  # fmt: skip
    assert not offenders, "\n".join(offenders)
