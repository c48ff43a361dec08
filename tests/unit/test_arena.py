"""The arena's accounting: geometry against brute force, floors, allocation order, and random
allocate/free of pages and rows (hypothesis) with every count rechecked after each operation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorasrv.engine.arena import (
    KV_FLOOR_SHARE,
    Arena,
    ArenaGeometry,
    Floors,
    arena_floors,
    pages_needed,
)
from lorasrv.ids import BlockId


def geometry(num_pages: int, page_bytes: int, row_bytes: int) -> ArenaGeometry:
    max_rows = num_pages * page_bytes // row_bytes if row_bytes else 0
    return ArenaGeometry(num_pages, page_bytes, row_bytes, max_rows)


GEOMETRIES = st.builds(geometry, st.integers(1, 40), st.integers(1, 12), st.integers(1, 30))


@given(GEOMETRIES)
def test_row_pages_and_page_rows_agree_with_byte_ranges(geo: ArenaGeometry) -> None:
    for row in range(geo.max_rows):
        start = geo.rows_offset + row * geo.row_bytes
        byte_pages = {b // geo.page_bytes for b in range(start, start + geo.row_bytes)}
        assert set(geo.row_pages(row)) == byte_pages
        assert start + geo.row_bytes <= geo.num_pages * geo.page_bytes
    for page in range(geo.num_pages):
        assert set(geo.page_rows(page)) == {
            r for r in range(geo.max_rows) if page in geo.row_pages(r)
        }


def test_rows_end_at_the_top_of_the_arena() -> None:
    geo = geometry(10, 100, 300)  # 1000 bytes: 3 rows of 300, offset 100
    assert geo.max_rows == 3
    assert geo.rows_offset == 100
    assert list(geo.row_pages(0)) == [1, 2, 3]
    assert list(geo.row_pages(2)) == [7, 8, 9]
    assert list(geo.page_rows(0)) == []
    assert list(geo.page_rows(3)) == [0]
    assert list(geo.page_rows(4)) == [1]


def test_floors_keep_one_context_and_a_share_for_kv_and_max_rank_adapters() -> None:
    geo = geometry(1000, 10, 20)  # 500 rows of 2 pages
    floors = arena_floors(
        geo, page_size=16, context_length=64, max_lora_rank=8, max_loras_per_batch=None
    )
    assert floors.kv_pages == int(KV_FLOOR_SHARE * 1000)  # the share beats 4 pages of context
    assert floors.rows == 8 * 8  # the default of 8 adapters at max rank
    long = arena_floors(
        geo, page_size=16, context_length=16 * 300, max_lora_rank=8, max_loras_per_batch=3
    )
    assert long.kv_pages == 300
    assert long.rows == 24
    # a floor that the arena cannot hold above the KV floor shrinks to what is there
    huge = arena_floors(
        geo, page_size=16, context_length=64, max_lora_rank=64, max_loras_per_batch=100
    )
    assert huge.rows == 500 - 50  # rows covering no page of the KV floor (pages 0..99)
    assert arena_floors(
        geometry(8, 10, 0), page_size=4, context_length=8, max_lora_rank=8, max_loras_per_batch=2
    ) == Floors(2, 0)


def test_kv_goes_up_from_the_bottom_and_rows_down_from_the_top() -> None:
    geo = geometry(10, 100, 100)  # rows and pages coincide: row r covers page r
    arena = Arena(geo, Floors(2, 2))
    assert arena.first_row == 2
    assert arena.kv_limit == 8
    assert arena.allocate(3) == [BlockId(0), BlockId(1), BlockId(2)]
    assert arena.allocate_rows(2) == (8, 9)  # the highest, ascending: one run
    assert arena.allocate_rows(1) == (7,)
    assert arena.num_free_pages == 4  # pages 3..6
    assert arena.num_free_rows == 4  # rows 3..6
    assert arena.allocate(1) == [BlockId(3)]
    assert arena.num_free_rows == 3
    arena.free_rows([7])
    assert arena.num_free_pages == 4  # page 7 is back
    arena.free([BlockId(0)])
    assert arena.allocate(1) == [BlockId(0)]
    arena.check_invariants()


def test_a_page_under_part_of_a_row_is_lost_to_kv_until_the_row_goes() -> None:
    geo = geometry(6, 100, 150)  # 4 rows of 1.5 pages: rows 2 and 3 share page 4
    arena = Arena(geo, Floors(0, 0))
    assert arena.allocate_rows(1) == (3,)  # pages 4, 5
    assert arena.num_free_pages == 4
    assert arena.allocate_rows(1) == (2,)  # pages 3, 4
    assert arena.num_free_pages == 3
    arena.free_rows([3])
    assert arena.num_free_pages == 4  # page 5 only: row 2 still covers page 4
    assert arena.allocate(4) == [BlockId(0), BlockId(1), BlockId(2), BlockId(5)]
    assert arena.num_free_rows == 0  # rows 0, 1 and 3 each lie over a KV page now
    arena.check_invariants()


def test_double_free_is_caught() -> None:
    arena = Arena(geometry(4, 10, 10), Floors(0, 0))
    pages = arena.allocate(1)
    arena.free(pages)
    with pytest.raises(AssertionError, match="double free of page"):
        arena.free(pages)
    rows = arena.allocate_rows(1)
    arena.free_rows(rows)
    with pytest.raises(AssertionError, match="double free of row"):
        arena.free_rows(rows)


def test_pages_needed() -> None:
    assert [pages_needed(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


class ArenaMachine(RuleBasedStateMachine):
    """Random allocate/free of pages and rows: nothing leaks, no page is both KV and row."""

    arena: Arena

    @initialize(
        num_pages=st.integers(1, 30),
        page_bytes=st.integers(1, 8),
        row_bytes=st.integers(1, 20),
        kv_share=st.integers(0, 10),
        row_share=st.integers(0, 10),
    )
    def setup(
        self, num_pages: int, page_bytes: int, row_bytes: int, kv_share: int, row_share: int
    ) -> None:
        geo = geometry(num_pages, page_bytes, row_bytes)
        kv_floor = num_pages * kv_share // 10
        # the largest row floor that sits above the KV floor, scaled
        above = geo.max_rows - Arena(geo, Floors(kv_floor, 0)).first_row
        self.arena = Arena(geo, Floors(kv_floor, above * row_share // 10))
        self.pages: list[BlockId] = []
        self.rows: list[int] = []

    @rule(num=st.integers(1, 6))
    def allocate_pages(self, num: int) -> None:
        if self.arena.can_allocate(num):
            got = self.arena.allocate(num)
            assert len(got) == num
            assert not set(got) & set(self.pages)
            self.pages += got
        else:
            assert self.arena.num_free_pages < num

    @rule(num=st.integers(1, 6))
    def allocate_rows(self, num: int) -> None:
        if self.arena.can_allocate_rows(num):
            got = self.arena.allocate_rows(num)
            assert len(got) == num
            assert not set(got) & set(self.rows)
            self.rows += got
        else:
            assert self.arena.num_free_rows < num

    @precondition(lambda self: self.pages)
    @rule(data=st.data())
    def free_pages(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.pages), unique=True, min_size=1))
        self.arena.free(chosen)
        self.pages = [p for p in self.pages if p not in chosen]

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def free_rows(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.rows), unique=True, min_size=1))
        self.arena.free_rows(chosen)
        self.rows = [r for r in self.rows if r not in chosen]

    @invariant()
    def counts_hold(self) -> None:
        self.arena.check_invariants()
        assert self.arena.num_used_pages == len(self.pages)
        assert self.arena.num_used_rows == len(self.rows)
        geo = self.arena.geometry
        covered = {p for r in self.rows for p in geo.row_pages(r)}
        assert not covered & set(self.pages), "a KV page lies under an allocated row"
        assert all(p < self.arena.kv_limit for p in self.pages)
        assert all(r >= self.arena.first_row for r in self.rows)

    def teardown(self) -> None:
        if not hasattr(self, "arena"):
            return
        self.arena.free(self.pages)
        self.arena.free_rows(self.rows)
        self.arena.check_invariants()
        # everything back: the whole region each side may use is free again
        assert self.arena.num_free_pages == self.arena.kv_limit
        assert self.arena.num_free_rows == self.arena.geometry.max_rows - self.arena.first_row


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_an_arena_smaller_than_one_context_still_holds_one_adapter() -> None:
    geo = geometry(100, 10, 20)  # 50 rows of 2 pages
    floors = arena_floors(
        geo, page_size=4, context_length=8192, max_lora_rank=8, max_loras_per_batch=None
    )
    assert floors.kv_pages == 84  # one context would be 2048 pages: all but 8 rows' pages
    assert floors.rows == 8
    arena = Arena(geo, floors)
    assert arena.can_allocate_rows(8)


def test_an_adapters_rows_come_as_one_ascending_run_when_free_rows_allow() -> None:
    """An upload copies one run of consecutive rows at a time: free neighbours give one run."""
    geo = ArenaGeometry(num_pages=40, page_bytes=10, row_bytes=10, max_rows=40)
    arena = Arena(geo, Floors(8, 8))
    first = arena.allocate_rows(16)
    assert first == tuple(range(24, 40))
    arena.free_rows(first[4:8])  # a hole: 28..31
    again = arena.allocate_rows(6)
    assert again == (22, 23, 28, 29, 30, 31)  # highest free first, still ascending
