"""amd_fast's kernels (installed as `amd_fast.kernels`): each op beside its pure-PyTorch reference.

- `fused_alignment_loss` (alignment_loss.py): [LayerNorm] -> projection -> [normalize] -> distance, chunked
  over tokens so the [N, D_teacher] projection never exists in the loss-only case;
- `gather_tokens` / `gather_rows` (gather.py): index gathers with the position-embedding add fused in.

Each runs on one of the backends in backend.py: Triton on CUDA, the fastest CPU twin on CPU.
"""

from amd_fast.kernels.alignment_loss import alignment_loss_reference, fused_alignment_loss
from amd_fast.kernels.backend import resolve, select, selected
from amd_fast.kernels.gather import gather_reference, gather_rows, gather_tokens

__all__ = [
    "alignment_loss_reference",
    "fused_alignment_loss",
    "gather_reference",
    "gather_rows",
    "gather_tokens",
    "resolve",
    "select",
    "selected",
]
