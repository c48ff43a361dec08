"""Suite-wide settings: tiny tensors everywhere, so torch runs on one intra-op thread."""

from __future__ import annotations

import os

import torch

from lorasrv.demo import TRAIN_STEPS_ENV

# Intra-op threads only add overhead for tiny tensors, and on a shared 2-core machine their
# spin-waiting made the model tests about 8x slower.
torch.set_num_threads(1)

# The demo model trains for ~15 s when built; tests build it often, so a few steps do (its own cache
# folder; subprocesses inherit this). tests/unit/test_demo.py trains the real one once.
os.environ.setdefault(TRAIN_STEPS_ENV, "2")

# The references are transformers' own torch code. transformers 5 swaps layers for Hugging Face
# hub kernels by default (fetched at run time, other numerics, and it then needs the `kernels`
# package); off, the suite runs the same with or without `kernels` installed.
os.environ.setdefault("USE_HUB_KERNELS", "0")
