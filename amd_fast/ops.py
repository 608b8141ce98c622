"""Token-level ops the models share, dispatched to amd_fast.kernels (Triton on CUDA, the fastest CPU twin on
CPU; `objective.kernels` / `amd_fast.kernels.select` force one, `reference` is plain PyTorch).

Shape legend: B batch, N tokens, V gathered tokens, D width, K values per patch.
"""

from __future__ import annotations

import torch

try:
    from amd_fast import kernels as _kernels
except ImportError:  # a checkout that was never `pip install -e .`-ed: load the top-level kernels/ in its place

    def _load_checkout_kernels():
        import importlib.util
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "amd_fast.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["amd_fast.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod

    _kernels = _load_checkout_kernels()


def gather_tokens(x_BND: torch.Tensor, ids_BV: torch.Tensor) -> torch.Tensor:
    """`out[b, j] = x[b, ids[b, j]]` -> [B, V, D].

    Never builds a [B, V, D] index tensor (the reference code uses `.repeat(1, 1, D)`); the backward is a
    scatter-add into [B*N, D]. Any width and dtype, int32 or int64 indices.
    """
    return _kernels.gather_tokens(x_BND, ids_BV)


def gather_rows(table_ND: torch.Tensor, ids_BV: torch.Tensor, base_BVD: torch.Tensor | None = None) -> torch.Tensor:
    """`out[b, j] = (base[b, j] +) table[ids[b, j]]` for a table shared by the batch (position embeddings)
    -> [B, V, D]. With base, the add is fused into the gather (`x + E[ids]` in one pass)."""
    return _kernels.gather_rows(table_ND, ids_BV, base_BVD)


def autocast_inputs(device_type: str, *tensors):
    """Operands of a custom Function cast as autocast would cast a GEMM's -> (dtype or None, tensors)."""
    return _kernels.backend.autocast_inputs(device_type, *tensors)


def no_autocast(device_type: str):
    return _kernels.backend.no_autocast(device_type)
