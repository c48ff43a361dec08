"""`python -m lorasrv`: see `lorasrv.cli`."""

from __future__ import annotations

from lorasrv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
