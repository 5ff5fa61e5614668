"""Test set-up. Without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before any @triton.jit decorator runs, hence before dycon_kernels imports."""
import os

import pytest
import torch

# Kernel outputs start as NaN, so an element a kernel forgets to write fails its comparison.
os.environ["DYCON_POISON"] = "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dycon_kernels import backends  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(device=DEVICE):
    """The fused backends that can run on ``device`` here."""
    return [b for b in backends.available_backends(device) if b != "reference"]


def pytest_report_header(config):
    return f"dycon: device={DEVICE}, backends={backends.available_backends(DEVICE)}, torch={torch.__version__}"


@pytest.fixture
def device():
    return DEVICE


# nnU-Net draws 10^8 foreground intensities per fingerprint (seconds and 400 MB a channel); the
# tests' volumes have a few hundred foreground voxels, so 10^5 draws describe them as well.
os.environ["DYCON_FOREGROUND_SAMPLES"] = "1e5"
