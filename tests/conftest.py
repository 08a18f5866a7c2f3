import os
import shutil

# Two cores: one thread per test process keeps timings stable and avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in its interpreter; it is chosen when kernels are defined,
# so this must be set before anything imports triton.
if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DATA = os.path.join(os.path.dirname(__file__), "..", "recipes", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_dir():
    return os.path.abspath(DATA)
