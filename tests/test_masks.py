import pytest
import torch

from amd_fast.masks import MaskGenerator, collate_masks, running_cell_keep


def _draw(mg, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return collate_masks([mg(g) for _ in range(n)])


def test_paper_video_counts():
    """METHOD.md: 16x224x224, tubelet 2, p 16, rho_s 0.9, rho_t 0.75 -> 160 / 232 / 392 / 1408."""
    mg = MaskGenerator((8, 14, 14), "tube", 0.9, 0.75)
    m = _draw(mg)
    assert m["ids_vis_s"].shape == (4, 160)
    assert m["ids_delta"].shape == (4, 232)
    assert m["ids_masked_s"].shape == (4, 1408)
    assert mg.counts == {"vis_s": 160, "delta": 232, "masked_s": 1408, "dec": 1408}


def test_asymmetric_sets_are_nested_and_partition():
    mg = MaskGenerator((4, 6, 6), "tube", 0.9, 0.5)
    m = _draw(mg)
    N = 4 * 36
    for b in range(4):
        vis, delta, masked = (set(m[k][b].tolist()) for k in ("ids_vis_s", "ids_delta", "ids_masked_s"))
        assert not vis & masked
        assert vis | masked == set(range(N))
        assert delta <= masked  # the teacher's extra tokens are masked for the student
        assert not vis & delta
        assert all(m[k][b].diff().gt(0).all() for k in ("ids_vis_s", "ids_delta", "ids_masked_s"))


def test_tube_repeats_the_spatial_pattern_over_time():
    t, h, w = 4, 5, 5
    mg = MaskGenerator((t, h, w), "tube", 0.75)
    ids = mg(torch.Generator().manual_seed(3))["ids_vis_s"]
    per_t = ids.view(t, -1)
    P = h * w
    for ti in range(t):
        assert torch.equal(per_t[ti] - ti * P, per_t[0])


def test_fresh_mask_per_sample_and_reproducible():
    mg = MaskGenerator((2, 8, 8), "tube", 0.75, 0.5)
    a, b = _draw(mg, seed=1), _draw(mg, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ids_vis_s"][0], a["ids_vis_s"][1])
    assert not torch.equal(a["ids_vis_s"], _draw(mg, seed=2)["ids_vis_s"])


def test_random_kind_shuffles_all_tokens():
    mg = MaskGenerator((2, 4, 4), "random", 0.75)
    ids = mg(torch.Generator().manual_seed(0))["ids_vis_s"]
    assert ids.numel() == 32 - 24
    assert mg.counts["delta"] == 0


def test_running_cell_pattern():
    keep = running_cell_keep((4, 4, 4), 0.5, ptr=0).view(4, 4, 4)
    assert keep.float().mean() == 0.5
    for ti in range(4):
        cell = keep[ti, :2, :2]
        assert torch.equal(keep[ti, 2:, 2:], cell)  # tiled
    assert not torch.equal(keep[0], keep[1])  # the cell runs over time


def test_decoder_masking_keeps_a_subset_of_masked_tokens():
    mg = MaskGenerator((4, 8, 8), "tube", 0.75, None, decoder_ratio=0.5)
    m = _draw(mg)
    n_masked = 4 * (64 - 16)
    assert m["ids_dec"].shape == (4, n_masked - n_masked // 2)
    for b in range(4):
        assert set(m["ids_dec"][b].tolist()) <= set(m["ids_masked_s"][b].tolist())


def test_bad_ratios_are_errors():
    with pytest.raises(ValueError, match="teacher"):
        MaskGenerator((2, 4, 4), "tube", 0.5, 0.75)
    with pytest.raises(ValueError, match="kind"):
        MaskGenerator((2, 4, 4), "diagonal", 0.5)
