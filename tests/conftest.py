import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def specs_dir():
    return SPECS
