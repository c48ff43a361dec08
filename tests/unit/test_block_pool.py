"""BlockPool: page accounting never hands one page to two owners."""

from __future__ import annotations

import pytest

from lorasrv.engine.block_pool import BlockPool, pages_needed


def test_pages_needed_rounds_up() -> None:
    assert [pages_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_and_free_round_trip() -> None:
    pool = BlockPool(8)
    first = pool.allocate(3)
    second = pool.allocate(5)
    assert len(set(first) | set(second)) == 8
    assert pool.num_free == 0
    assert not pool.can_allocate(1)
    pool.free(first)
    assert pool.num_free == 3
    assert sorted(pool.allocate(3)) == sorted(first)


def test_double_free_is_caught() -> None:
    pool = BlockPool(2)
    pages = pool.allocate(1)
    pool.free(pages)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(pages)


def test_over_allocation_is_a_bug() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.allocate(3)
