import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter (set before any kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("MOEC_TEST_DEVICE") == "cuda":  # on a GPU machine: tests build their tensors and models there
    torch.set_default_device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False

# max relative error (vs the reference's max magnitude) allowed per compute dtype
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
