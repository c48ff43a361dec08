"""Whether actors recheck their tables' invariants after every message. The test suite turns it
on (tests/conftest.py); a server leaves it off, since a full check costs time proportional to the
tables (every arena page and row, every adapter version) on each message.
"""

from __future__ import annotations

enabled = False
