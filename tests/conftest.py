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


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_amd_fast_cache", ""), ignore_errors=True)
