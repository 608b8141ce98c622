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


@dataclass
class StepFlops:
    teacher: float
    student_forward: float

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
    s = _encoder(v_s + enc.num_prefix, d, enc.depth, k_in, enc.blocks[0].mlp.fc1.out_features / d)
    s += 2.0 * v_s * d * d_dec  # encoder_to_decoder
    s += len(dec.blocks) * flops_block(v_s + m, v_s + m, d_dec) + 2.0 * m * d_dec * dec.head.out_features
    t = 0.0
    if teacher is not None:
        te = teacher.encoder
        d_t = te.embed_dim
        n_t = (v_s + dl if objective == "amd" else v_s) + te.num_prefix
        t = _encoder(n_t, d_t, max(teacher.layers), k_in, te.blocks[0].mlp.fc1.out_features / d_t)
        n_pairs = len(teacher.layers)
        s += n_pairs * 2.0 * v_s * d * d_t  # projection heads
        if model.generators is not None:
            g_depth = len(model.generators[0].blocks)
            s += n_pairs * g_depth * flops_block(v_s + dl, v_s + dl, d_t)
    return StepFlops(teacher=t * batch_size, student_forward=s * batch_size)
