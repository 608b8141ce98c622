import pytest
import torch

from amd_fast.models.vit import Mlp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 24), (2, 7, 24), (3, 33, 24)])
def test_mlp_recomputing_gelu_matches_autograd_exactly(dtype, shape):
    """The memory-saving MLP (gelu recomputed in backward) gives autograd's values and gradients."""
    m = Mlp(24, 96).to(dtype)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.grad_fn.name().endswith("_MlpRecomputeGeluBackward")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    x2 = x.detach().clone().requires_grad_()
    y2 = m.fc2(m.act(m.fc1(x2)))  # plain autograd
    grads2 = torch.autograd.grad(y2, [x2, *m.parameters()], g)
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_mlp_saves_less_than_autograd():
    m = Mlp(32, 128)
    x = torch.randn(4, 50, 32, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}
    for name, fn in (("recompute", lambda: m(x)), ("autograd", lambda: m.fc2(m.act(m.fc1(x))))):
        storages = {}

        def pack(t, storages=storages):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:  # activations only; views of one storage count once
                storages[ptr] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        saved[name] = sum(storages.values())
    assert saved["recompute"] == 4 * 50 * (32 + 128)  # x and the pre-activation
    assert saved["autograd"] == 4 * 50 * (32 + 128 + 128)  # ... and gelu's output
