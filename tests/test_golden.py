"""The golden runs (tests/golden_runs.py) against tests/golden/tiny.json: the per-step losses of the tiny presets'
short runs and a fine-tuned model's weights.

On the CPU model the file was written on, exactly: same code path, same BLAS kernels, same bits (a refactor that
should not change the numbers must pass this). On another CPU model, MKL / oneDNN may pick other kernels (AVX-512
vs AMX tiles, other blockings) whose fp32 sums round differently: 1e-5 relative then (fp32 unit roundoff is 6e-8;
8-10 steps of AdamW carry it a few orders up, measured ~1e-6 between runs with different thread counts).
Regenerate with `python tests/golden_runs.py --write` when a change is meant to alter the numbers, and say why.
"""

import json

import pytest
from golden_runs import GOLDEN, cpu_model, figures


@pytest.fixture(scope="module")
def runs():
    return figures()


def test_losses_and_weights_match_the_golden_file(runs):
    golden = json.loads(GOLDEN.read_text())
    exact = golden["cpu"] == cpu_model()
    assert runs.keys() == golden.keys()
    for name, want in golden.items():
        if name in ("cpu", "finetune_weights_sha256"):
            continue
        got = runs[name]
        if isinstance(want, list):
            assert len(got) == len(want), name
            pairs = [(f"{name} step {i + 1} {k}", g[k], w[k]) for i, (g, w) in enumerate(zip(got, want)) for k in w]
        else:
            pairs = [(f"{name} {k}", got[k], w) for k, w in want.items()]
        for what, g, w in pairs:
            assert g == w if exact else g == pytest.approx(w, rel=1e-5, abs=1e-7), (what, g, w)
    if exact:
        assert runs["finetune_weights_sha256"] == golden["finetune_weights_sha256"]
