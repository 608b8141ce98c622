"""`auto` by measurement (amd_fast/measure.py): the choice follows the timings both ways, the trials run on this
machine and are cached with their figures, and a cached verdict is not measured again."""

import json

import pytest
import torch

from amd_fast import attention, device, measure


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Real trials (the suite's fixed timings removed), a cache of this test's own, no verdict in memory."""
    monkeypatch.delenv("AMD_FAST_FAKE_TIMINGS", raising=False)
    monkeypatch.setenv("AMD_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "_memo", {})
    monkeypatch.setattr(attention, "_DISPATCH", {})
    return tmp_path / "choices"


def _qkv(grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).requires_grad_(grad) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("fastest", ["sdpa", "math"])
def test_attention_auto_takes_the_fastest_measured(monkeypatch, fastest):
    other = {"sdpa": "math", "math": "sdpa"}[fastest]
    timings = {"precision": {"float32": 1.0, "bfloat16": 2.0}, "attention": {fastest: 0.1, other: 0.3}}
    monkeypatch.setenv("AMD_FAST_FAKE_TIMINGS", json.dumps(timings))
    monkeypatch.setattr(attention, "_DISPATCH", {})
    called = []
    for name in ("sdpa", "math"):
        real = attention._IMPLS[name]
        monkeypatch.setitem(attention._IMPLS, name, lambda q, k, v, n=name, f=real: called.append(n) or f(q, k, v))
    q, k, v = _qkv()
    out = attention.get_attention("auto")(q, k, v)
    assert called == [fastest]
    torch.testing.assert_close(out, attention.attention_math(q, k, v), rtol=1e-5, atol=1e-6)
    # a forced backend is never measured
    attention.get_attention(other)(q, k, v)
    assert called == [fastest, other]


def test_precision_trial_runs_here_and_is_cached(fresh, monkeypatch):
    dt, why = device.fast_cpu_dtype()
    assert dt in (torch.float32, torch.bfloat16)
    files = list(fresh.glob("*.json"))
    saved = json.loads(files[0].read_text()) if files else None
    if saved is None:  # the rounds disagreed or the machine was busy: fp32 for now, nothing kept
        assert dt == torch.float32 and "this run only" in why
        return
    assert set(saved["timings"]) == {"float32", "bfloat16"}
    assert all(len(v) == 4 and min(v) > 0 for v in saved["timings"].values())
    assert measure.cpu_model_and_flags()[0] in saved["machine"] and "ms" in why
    # another process (no verdict in memory) reads the file and does not measure again
    monkeypatch.setattr(measure, "_memo", {})
    monkeypatch.setattr(device, "_precision_trial", lambda d: pytest.fail("measured again"))
    dt2, why2 = device.fast_cpu_dtype()
    assert dt2 == dt and "(cached)" in why2


def test_a_measurement_whose_rounds_disagree_is_not_kept(fresh, monkeypatch):
    """A busy moment flips a round, or the machine is busy with other work: this run takes fp32 (the exact one) and
    the next run measures again; rounds that agree on a quiet machine are kept."""
    trial = {"float32": [1.0, 1.0, 1.0, 1.0], "bfloat16": [0.5, 0.5, 2.0, 0.5]}  # best: bf16 2x; one round: fp32
    monkeypatch.setattr(device, "_precision_trial", lambda d: trial)
    load = [0.0]
    monkeypatch.setattr(measure.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    dt, why = device.fast_cpu_dtype()
    assert dt == torch.float32 and "rounds disagree" in why and not list(fresh.glob("*.json"))
    trial["bfloat16"][2] = 0.6  # every round says bf16 ...
    load[0] = 0.75 * (measure.os.cpu_count() or 1) + 0.1  # ... on a machine busy with other work: not kept either
    monkeypatch.setattr(measure, "_memo", {})
    dt, why = device.fast_cpu_dtype()
    assert dt == torch.float32 and not list(fresh.glob("*.json"))
    load[0] = 0.0
    monkeypatch.setattr(measure, "_memo", {})
    dt, why = device.fast_cpu_dtype()
    assert dt == torch.bfloat16 and "2.00x in bf16" in why and len(list(fresh.glob("*.json"))) == 1


def test_attention_trial_runs_here_per_shape_class(fresh):
    q, k, v = _qkv()
    fn = attention.get_attention("auto")
    fn(q, k, v)
    with torch.no_grad():  # forward only: another class
        fn(q, k, v)
    fn(q[:, :, :33], k, v)  # 33 queries: the same bucket (64) as 40, measured once
    whats = sorted(k.split(" | ")[-1] for k in measure._memo)  # measured once per class (kept on disk when the
    assert whats == ["attention/cpu float32 bh8 q64 k64 d16 fwd", "attention/cpu float32 bh8 q64 k64 d16 fwd+bwd"]
    for _, res in measure._memo.values():  # rounds agree, which a busy machine may prevent)
        assert set(res["timings"]) == {"sdpa", "math"} and all(len(v) == 3 for v in res["timings"].values())
    for f in fresh.glob("*.json"):
        assert json.loads(f.read_text())["key"] in measure._memo


@pytest.mark.parametrize("fastest", ["reference", "chunked"])
def test_kernel_auto_takes_the_fastest_measured(monkeypatch, fastest):
    """`auto` kernels: the fastest candidate at the call's shape class (plain PyTorch where a kernel loses), and
    the result is that backend's."""
    from amd_fast.kernels import backend as kb
    from amd_fast.kernels import gather as kg

    timings = {"native": 9.0, "triton": 9.0, "chunked": 2.0, "reference": 3.0}
    timings[fastest] = 0.1
    monkeypatch.setenv("AMD_FAST_FAKE_TIMINGS", json.dumps({"kernels": timings}))
    monkeypatch.setattr(kb, "_chosen", {})
    ran = []
    monkeypatch.setattr(kg, "_call", lambda name, *a, f=kg._call: ran.append(name) or f(name, *a))
    x, ids = torch.randn(2, 9, 5, requires_grad=True), torch.tensor([[0, 3, 8], [2, 2, 1]])
    out = kg.gather_tokens(x, ids)
    assert ran == [fastest]
    torch.testing.assert_close(out, kg.gather_reference(x.detach().view(18, 5), ids, 9))


def test_kernel_trials_run_here_per_shape_class_and_leave_the_graph_alone(fresh, monkeypatch):
    """Real trials: each candidate timed on the call's inputs (detached), cached once per shape class; the
    caller's gradients are those of one call."""
    from amd_fast.kernels import backend as kb
    from amd_fast.kernels import fused_alignment_loss

    monkeypatch.setattr(kb, "_chosen", {})
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 12, generator=g, requires_grad=True)
    w = torch.randn(16, 12, generator=g, requires_grad=True)
    t = torch.randn(2, 7, 16, generator=g)
    loss = fused_alignment_loss(h, w, None, t)
    loss.backward()
    ref = torch.nn.functional.mse_loss(h.detach() @ w.detach().t(), t)
    torch.testing.assert_close(loss.detach(), ref)
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.mse_loss(h2 @ w2.t(), t).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    fused_alignment_loss(h[:, :6], w, None, t[:, :6])  # 12 rows: the same bucket (16) as 14, not measured again
    (key,) = measure._memo  # one class measured (on disk too when its rounds agreed)
    assert key.split(" | ")[-1].startswith("kernels/alignment_loss cpu float32 r16")
    _, res = measure._memo[key]
    assert set(res["timings"]) == set(kb.candidates("alignment_loss", torch.device("cpu"), torch.float32))
