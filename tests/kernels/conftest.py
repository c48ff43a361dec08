"""Kernel-test setup: makes `lorasrv_kernels` importable from a bare checkout.

NOTE: a no-op once `pip install -e .` has installed kernels/ as `lorasrv_kernels`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("lorasrv_kernels") is None:
    _kernels_dir = Path(__file__).resolve().parents[2] / "kernels"
    _spec = importlib.util.spec_from_file_location(
        "lorasrv_kernels",
        _kernels_dir / "__init__.py",
        submodule_search_locations=[str(_kernels_dir)],
    )
    assert _spec is not None
    assert _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["lorasrv_kernels"] = _module
    _spec.loader.exec_module(_module)
