import json
import logging
import os
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def pytest_configure(config):
    logging.getLogger("amd_fast").setLevel(logging.INFO)
    # the decode check's verdicts (amd_fast/data/decode_check.py) go to a folder of this session, not ~/.cache
    config._amd_fast_cache = tempfile.mkdtemp(prefix="amd_fast_cache_")
    os.environ["AMD_FAST_CACHE"] = config._amd_fast_cache
    # `auto` precision, attention and kernels are measured on the machine (amd_fast/measure.py): bf16 wins on one CPU
    # kind and loses on another. No test may depend on the CPU it runs on, so the suite (and every process it starts)
    # sees fixed timings that pick fp32, SDPA and the kernels (native / Triton first, then the chunked twin); tests
    # of the choice itself set their own.
    os.environ["AMD_FAST_FAKE_TIMINGS"] = json.dumps({
        "precision": {"float32": 1.0, "bfloat16": 2.0},
        "attention": {"sdpa": 1.0, "math": 2.0},
        "kernels": {"native": 1.0, "triton": 1.0, "chunked": 2.0, "reference": 3.0},
    })  # fmt: skip


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_amd_fast_cache", ""), ignore_errors=True)
