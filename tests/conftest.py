"""Hypothesis profiles and test-wide settings.

Profiles (choose with ``HYPOTHESIS_PROFILE``): ``ci`` (default; deterministic, within minutes on 2 cores),
``dev`` (more examples), ``thorough`` (many examples, for a release).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    print_blob=True,
)
# ci: the same examples on every run (derandomize), so a landing never hinges on a lucky draw; the other
# profiles explore afresh and keep their failures in the example database.
settings.register_profile("ci", max_examples=12, **{**_common, "derandomize": True})
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=600, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # small k×k ops: threading only adds overhead and noise on a shared 2-core box


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group (FSDP2 needs one), torn down after the test."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed is not available, or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
