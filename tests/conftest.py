import os

# Two cores: one thread per test process keeps timings stable and avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (importing torch does not import triton)

# Interpreter mode is decided here, once, before anything imports triton: without CUDA the
# Triton kernels run in its CPU interpreter (they read TRITON_INTERPRET when they are defined);
# with CUDA they compile and run with their real tile configs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)

DATA = os.path.join(os.path.dirname(__file__), "..", "recipes", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_dir():
    return os.path.abspath(DATA)
