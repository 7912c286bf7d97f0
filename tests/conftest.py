"""Shared test fixtures: deterministic seeds and torch settings for a 2-core CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mnv3det.testing import randomize_bn_stats

__all__ = ["randomize_bn_stats"]  # tests import it as `from conftest import ...`


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
