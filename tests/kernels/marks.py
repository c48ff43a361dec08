"""Where the kernel tests can run: Triton needs CUDA, or the CPU interpreter, which must be chosen
(TRITON_INTERPRET=1) before Python starts; GPU-only tests need CUDA without the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

IS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
# The interpreter runs on CPU tensors; without it Triton needs CUDA ones.
TRITON_DEVICE = "cpu" if IS_INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    not (IS_INTERPRET or HAS_CUDA),
    reason="Triton needs CUDA, or TRITON_INTERPRET=1 set before Python starts (make test-kernels)",
)
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA or IS_INTERPRET, reason="needs CUDA, without the interpreter"
)
