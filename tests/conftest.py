"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def float64():
    """Exact comparisons in float64 for one test module (``pytestmark =
    pytest.mark.usefixtures("float64")``), without leaking the default dtype
    into modules that run fairseq's float32-only code."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
