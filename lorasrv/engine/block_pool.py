"""KV page accounting: which pages are free. Pure; the scheduler owns the only instance.

The runner owns the page memory; this only hands out page ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from lorasrv.ids import BlockId


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockPool:
    """A LIFO free list of page ids: recently freed pages are reused first (warm in cache)."""

    __slots__ = ("_free", "_is_free", "num_pages")

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: list[BlockId] = [BlockId(i) for i in reversed(range(num_pages))]
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[BlockId]:
        """Take `num` pages; the caller checked `can_allocate` (asking for more is a bug)."""
        assert num <= len(self._free), f"allocate({num}) with {len(self._free)} free"
        if num == 0:
            return []
        taken = self._free[-num:]
        del self._free[-num:]
        for block_id in taken:
            self._is_free[block_id] = False
        return taken

    def free(self, blocks: Iterable[BlockId]) -> None:
        for block_id in blocks:
            # NOTE: a double free would hand one page to two sequences and corrupt both.
            assert not self._is_free[block_id], f"double free of page {block_id}"
            self._is_free[block_id] = True
            self._free.append(block_id)
