"""Parallelism is applied from outside: only amd_fast/engine.py imports deepspeed or torch.distributed.

Model, objective, data and kernel code (amd_fast/ and kernels/, installed as amd_fast.kernels) stays free of it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "amd_fast"
OWNER = PACKAGE / "engine.py"
FORBIDDEN = ("deepspeed", "torch.distributed")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "torch":  # `from torch import distributed`
                names += [f"torch.{a.name}" for a in node.names]
    return names


def test_only_the_engine_imports_deepspeed_or_torch_distributed():
    offenders = {
        str(p.relative_to(ROOT)): name
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
        if p != OWNER
        for name in _imports(p)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not offenders, f"only amd_fast/engine.py may import {FORBIDDEN}; found {offenders}"


def test_the_engine_module_is_the_one_that_does():
    assert any(n.startswith("deepspeed") for n in _imports(OWNER))
    assert "torch.distributed" in _imports(OWNER)
