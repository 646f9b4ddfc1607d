"""Engine tests: the helper module (engine_tiny) importable whatever pytest's import mode, and one torch thread
per test (bitwise comparisons need the same thread count as the kill and DDP workers, which use one; tiny models
gain nothing from more on a shared machine)."""

import sys
from pathlib import Path

import pytest
import torch

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
