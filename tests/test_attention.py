import pytest
import torch

from amd_fast.attention import attention_math, attention_sdpa, get_attention, select_backend
from amd_fast.models.vit import Block


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 16), (2, 2, 64, 32)])
def test_sdpa_matches_math_forward_and_backward(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = attention_math(q, k, v)
    out = attention_sdpa(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_auto_picks_sdpa_on_cpu_and_forced_backends_are_checked():
    assert select_backend("auto", "cpu") == "sdpa"
    assert select_backend("math", "cpu") == "math"
    for name in ("flash_attn", "xformers"):
        with pytest.raises(RuntimeError, match="cannot run"):
            select_backend(name, "cpu")
    with pytest.raises(ValueError, match="allowed"):
        select_backend("fastest", "cpu")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_block_keep_last_equals_full_rows(backend):
    """The last decoder / generator block computes only the rows that are read: same values."""
    blk = Block(32, 4, attn_backend=backend).double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(blk(x, keep_last=4), blk(x)[:, -4:])


def test_forced_backends_give_the_same_block_output():
    x = torch.randn(2, 9, 32)
    blocks = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        blocks[backend] = Block(32, 4, attn_backend=backend)
        assert blocks[backend].attn.attn_fn is get_attention(backend)
    torch.testing.assert_close(blocks["sdpa"](x), blocks["math"](x), atol=1e-5, rtol=1e-5)
