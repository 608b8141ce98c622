"""Token-level ops the models share. The kernels issue swaps fused versions in behind these names.

Shape legend: B batch, N tokens, V gathered tokens, D width, K values per patch.
"""

from __future__ import annotations

import torch


def gather_tokens(x_BND: torch.Tensor, ids_BV: torch.Tensor) -> torch.Tensor:
    """`out[b, j] = x[b, ids[b, j]]` -> [B, V, D].

    One `index_select` on the flattened rows: on CPU it is faster than `torch.gather` with an
    index expanded to [B, V, D], and it never builds a [B, V, D] index tensor (the reference code
    uses `.repeat(1, 1, D)`). Its backward is an index_add (scatter-add) into [B*N, D].
    """
    B, N, D = x_BND.shape
    offsets = torch.arange(B, device=ids_BV.device, dtype=ids_BV.dtype).mul_(N).unsqueeze(1)
    flat_ids = (ids_BV + offsets).reshape(-1)
    return x_BND.reshape(B * N, D).index_select(0, flat_ids).view(B, ids_BV.shape[1], D)


def gather_rows(table_ND: torch.Tensor, ids_BV: torch.Tensor) -> torch.Tensor:
    """`out[b, j] = table[ids[b, j]]` for a table shared by the batch (position embeddings) -> [B, V, D]."""
    return table_ND.index_select(0, ids_BV.reshape(-1)).view(*ids_BV.shape, table_ND.shape[-1])
