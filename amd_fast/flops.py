"""Analytic model FLOPs of one training step (2 FLOPs per multiply-add).

Convention (as the reference's ~433 GFLOP count for the paper's video step): the teacher's forward
once, the student's forward + backward as three forwards. Model FLOPs count the reference math
(every row of every block), so rows amd_fast skips (the last decoder and generator blocks compute
only the rows that are read) show up as speed, not as fewer FLOPs. Norms, softmax, GELU and the
optimizer are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from amd_fast.models.vit import flops_block
from amd_fast.objectives import OBJECTIVES


@dataclass
class StepFlops:
    """Forward FLOPs per phase for one micro-batch; the student's backward counts as two forwards."""

    teacher: float
    encoder: float
    heads: float  # projection heads P_k
    generators: float
    decoder: float

    @property
    def student_forward(self) -> float:
        return self.encoder + self.heads + self.generators + self.decoder

    @property
    def backward(self) -> float:
        return 2 * self.student_forward

    @property
    def total(self) -> float:
        return self.teacher + 3 * self.student_forward


def _encoder(n: int, dim: int, blocks: int, k_in: int, mlp_ratio: float = 4.0) -> float:
    return 2.0 * n * k_in * dim + blocks * flops_block(n, n, dim, mlp_ratio)


def step_flops(model, teacher, counts: dict[str, int], objective: str, batch_size: int) -> StepFlops:
    """counts: MaskGenerator.counts (vis_s, delta, masked_s, dec)."""
    enc = model.encoder
    k_in = 3 * enc.tubelet_size * enc.patch_size**2
    v_s, dl, m = counts["vis_s"], counts["delta"], counts["dec"]
    d = enc.embed_dim
    dec = model.decoder
    d_dec = dec.head.in_features
    encoder = _encoder(v_s + enc.num_prefix, d, enc.depth, k_in, enc.blocks[0].mlp.fc1.out_features / d)
    decoder = 2.0 * v_s * d * d_dec  # encoder_to_decoder
    decoder += len(dec.blocks) * flops_block(v_s + m, v_s + m, d_dec) + 2.0 * m * d_dec * dec.head.out_features
    t = heads = gen = 0.0
    if teacher is not None:
        te = teacher.encoder
        d_t = te.embed_dim
        n_t = (v_s + dl if OBJECTIVES[objective].uses_delta else v_s) + te.num_prefix
        t = _encoder(n_t, d_t, max(teacher.layers), k_in, te.blocks[0].mlp.fc1.out_features / d_t)
        n_pairs = len(teacher.layers)
        heads = n_pairs * 2.0 * v_s * d * d_t
        if model.generators is not None:
            g_depth = len(model.generators[0].blocks)
            gen = n_pairs * g_depth * flops_block(v_s + dl, v_s + dl, d_t)
    b = batch_size
    return StepFlops(teacher=t * b, encoder=encoder * b, heads=heads * b, generators=gen * b, decoder=decoder * b)
