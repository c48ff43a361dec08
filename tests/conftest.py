"""Suite-wide settings: tiny tensors everywhere, so torch runs on one intra-op thread."""

from __future__ import annotations

import torch

# Intra-op threads only add overhead for tiny tensors, and on a shared 2-core machine their
# spin-waiting made the model tests about 8x slower.
torch.set_num_threads(1)

from lorasrv.engine import invariants  # noqa: E402

# Every actor rechecks its tables after every message in the tests (off in a server: O(tables)).
invariants.enabled = True
