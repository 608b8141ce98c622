"""Masks as index tensors, drawn per sample.

Convention: ids are token indices into the flattened (t, h, w) grid, sorted ascending within each
set (ascending ids keep gathers memory-local; attention is order-free and the losses are means, so
order does not change the math). Per sample a generator returns:

- `ids_vis_s`    [V_s]    tokens the student encoder sees
- `ids_delta`    [Delta]  tokens only the teacher sees (AMD; empty for DMAE / MAE)
- `ids_masked_s` [N-V_s]  tokens masked for the student (the reconstruction positions)
- `ids_dec`      [M_d]    masked tokens the decoder reconstructs (= ids_masked_s unless decoder masking)

Every sample gets a fresh mask from the caller's `torch.Generator`, so masks are reproducible per
sample wherever they are drawn (in the loader workers).
"""

from __future__ import annotations

import torch


def _expand_over_time(spatial_S: torch.Tensor, t: int, P: int) -> torch.Tensor:
    """Tube: the same spatial positions on each of the t temporal slots -> [t*S] token ids."""
    return (torch.arange(t).unsqueeze(1) * P + spatial_S.unsqueeze(0)).reshape(-1)


def running_cell_keep(grid: tuple[int, int, int], decoder_ratio: float, ptr: int) -> torch.Tensor:
    """VideoMAEv2's running-cell pattern: bool [N], True where the decoder keeps the token.

    A 2x2 cell holds `round(4 * ratio)` masked slots in a queue that advances by one per frame,
    tiled over the frame (RunningCellMaskingGenerator in OpenGVLab/VideoMAEv2).
    """
    t, h, w = grid
    n_mask = int(4 * decoder_ratio)
    if not 0 < n_mask < 4:
        raise ValueError(f"mask.decoder_ratio={decoder_ratio} must give 1-3 masked slots of a 2x2 cell")
    queue = torch.cat((torch.ones(n_mask), torch.zeros(4 - n_mask)))
    frames = []
    for ti in range(t):
        cell = queue[(torch.arange(4) + ptr + ti + 1) % 4].reshape(2, 2)
        frames.append(cell.repeat((h + 1) // 2, (w + 1) // 2)[:h, :w])
    return torch.stack(frames).reshape(-1) == 0


class MaskGenerator:
    """Draws one sample's asymmetric (AMD), shared (DMAE / MAE) mask as index tensors.

    kind="tube": the shuffle is over the P = h*w spatial positions and repeated over time (VideoMAE);
    kind="random": over all N tokens (MAE on images, where t = 1 and both are the same).
    AMD: shuffle once; the first P - floor(rho_s P) are V_s, the next floor(rho_s P) - floor(rho_t P)
    are Delta, so V_s is a strict subset of the teacher's V_t = V_s + Delta.
    """

    def __init__(
        self,
        grid: tuple[int, int, int],
        kind: str = "tube",
        student_ratio: float = 0.9,
        teacher_ratio: float | None = None,
        decoder_ratio: float = 0.0,
    ):
        self.grid = grid
        t, h, w = grid
        self.N = t * h * w
        self.kind = kind
        if kind == "tube":
            self.P, self.t_rep = h * w, t
        elif kind == "random":
            self.P, self.t_rep = self.N, 1
        else:
            raise ValueError(f"mask.kind={kind!r} is unknown; allowed: 'tube', 'random'")
        # int() truncates as VideoMAE's `int(mask_ratio * num_patches)`
        self.n_vis_s = self.P - int(student_ratio * self.P)
        self.n_vis_t = self.P - int(teacher_ratio * self.P) if teacher_ratio is not None else self.n_vis_s
        if self.n_vis_s < 1:
            raise ValueError(f"mask.student_ratio={student_ratio} leaves no visible token of {self.P}")
        if self.n_vis_t < self.n_vis_s:
            raise ValueError("the teacher must see at least the student's tokens (teacher_ratio <= student_ratio)")
        self.decoder_ratio = decoder_ratio
        n_masked = self.N - self.n_vis_s * self.t_rep
        self.n_dec = n_masked - int(decoder_ratio * n_masked)

    @property
    def counts(self) -> dict[str, int]:
        r = self.t_rep
        return {
            "vis_s": self.n_vis_s * r,
            "delta": (self.n_vis_t - self.n_vis_s) * r,
            "masked_s": self.N - self.n_vis_s * r,
            "dec": self.n_dec,
        }

    def __call__(self, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        perm = torch.randperm(self.P, generator=gen)
        vis = perm[: self.n_vis_s].sort().values
        delta = perm[self.n_vis_s : self.n_vis_t].sort().values
        masked = perm[self.n_vis_s :].sort().values
        ex = (lambda s: _expand_over_time(s, self.t_rep, self.P)) if self.t_rep > 1 else (lambda s: s)
        out = {"ids_vis_s": ex(vis), "ids_delta": ex(delta), "ids_masked_s": ex(masked)}
        out["ids_dec"] = out["ids_masked_s"] if self.decoder_ratio == 0 else self._decoder_ids(out["ids_masked_s"], gen)
        return out

    def _decoder_ids(self, masked: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Keep n_dec of the student-masked tokens, those on the running-cell pattern first.

        Departure from VideoMAEv2: its decoder keeps exactly the cell pattern, so the count varies per
        sample; here every sample keeps the same count (equal-length index tensors, no padding),
        filling from the pattern first and breaking ties at random.
        """
        ptr = int(torch.randint(4, (1,), generator=gen))
        keep = running_cell_keep(self.grid, self.decoder_ratio, ptr)[masked]
        priority = (~keep).float() + torch.rand(masked.shape[0], generator=gen) * 0.5
        chosen = masked[priority.argsort()[: self.n_dec]]
        return chosen.sort().values


def collate_masks(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample masks into [B, ...] index tensors."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
