"""PrefixCache, case by case: what a lookup finds, whose pages it keys apart, and when pages leave.

The random sequences of admit/finish/abort/evict/unload/flush are in test_prefix_cache_properties.
"""

from __future__ import annotations

import pytest

from lorasrv.engine.prefix_cache import CachedPage, PrefixCache, private_pages
from lorasrv.ids import AdapterId, BlockId

PAGE = 4
A, B, A_RELOADED = AdapterId(1), AdapterId(2), AdapterId(3)
TOKENS = tuple(range(100, 113))  # 13 tokens: 3 full pages and one token


def cache_pages(
    cache: PrefixCache, namespace: AdapterId | None, tokens: tuple[int, ...], first_page: int
) -> list[CachedPage]:
    """A sequence that computed `tokens` into pages first_page.. offers its full pages."""
    path: list[CachedPage] = []
    for i in range(len(tokens) // PAGE):
        page = BlockId(first_page + i)
        assert cache.insert(path, namespace, tokens[i * PAGE : (i + 1) * PAGE], page)
    return path


def pages(path: list[CachedPage]) -> list[int]:
    return [node.page for node in path]


def test_match_finds_the_longest_full_page_prefix() -> None:
    cache = PrefixCache(PAGE)
    cache_pages(cache, A, TOKENS, first_page=10)
    assert pages(cache.match(A, TOKENS)) == [10, 11, 12]
    assert pages(cache.match(A, TOKENS[:9])) == [10, 11]
    # A different token in page 1 ends the match there, whatever follows.
    changed = (*TOKENS[:5], 0, *TOKENS[6:])
    assert pages(cache.match(A, changed)) == [10]
    assert cache.match(A, (0, *TOKENS[1:])) == []


def test_match_leaves_the_last_token_to_compute() -> None:
    """A prompt that is exactly cached pages still computes its last token (for its logits)."""
    cache = PrefixCache(PAGE)
    cache_pages(cache, A, TOKENS, first_page=10)
    assert pages(cache.match(A, TOKENS[:12])) == [10, 11]
    assert pages(cache.match(A, TOKENS[:4])) == []
    assert pages(cache.match(A, TOKENS[:5])) == [10]
    assert cache.match(A, ()) == []


@pytest.mark.parametrize("other", [B, A_RELOADED, None], ids=["other", "reloaded", "base"])
def test_the_key_includes_the_adapter_version(other: AdapterId | None) -> None:
    """The same tokens under another adapter, a reload of the same one, or the base model have
    other KV: nothing is found, and caching them there takes pages of their own."""
    cache = PrefixCache(PAGE)
    cache_pages(cache, A, TOKENS, first_page=10)
    assert cache.match(other, TOKENS) == []
    cache_pages(cache, other, TOKENS, first_page=20)
    assert pages(cache.match(other, TOKENS)) == [20, 21, 22]
    assert pages(cache.match(A, TOKENS)) == [10, 11, 12]


def test_held_pages_are_never_evicted() -> None:
    cache = PrefixCache(PAGE)
    path = cache_pages(cache, A, TOKENS, first_page=10)  # the writer still holds them
    assert cache.num_evictable == 0
    assert cache.evict(5) == []
    reader = cache.match(A, TOKENS)[:2]
    cache.hold(reader)
    assert cache.release(path) == []
    # Page 12 alone is unheld: the reader holds 10 and 11.
    assert cache.evict(5) == [12]
    assert cache.release(reader) == []
    assert cache.evict(5) == [11, 10]  # deepest first: a parent never leaves before its child
    cache.check_invariants()
    assert cache.num_pages == 0


def test_eviction_is_least_recently_released_first() -> None:
    cache = PrefixCache(PAGE)
    old = cache_pages(cache, A, TOKENS[:4], first_page=10)
    new = cache_pages(cache, B, TOKENS[:4], first_page=20)
    cache.release(old)
    cache.release(new)
    again = cache.match(A, TOKENS[:5])
    cache.hold(again)  # A's page is used again: now B's is the older one
    cache.release(again)
    assert cache.evict(1) == [20]
    assert cache.evict(1) == [10]


def test_a_second_copy_of_a_cached_prefix_stays_private() -> None:
    """Two sequences computed the same page: the second holds the first's node, keeps its own
    page and frees it at its end; both hold the whole path."""
    cache = PrefixCache(PAGE)
    first = cache_pages(cache, A, TOKENS, first_page=10)
    second: list[CachedPage] = []
    assert not cache.insert(second, A, TOKENS[:4], BlockId(20))
    assert not cache.insert(second, A, TOKENS[4:8], BlockId(21))
    assert pages(second) == [10, 11]
    blocks = [BlockId(20), BlockId(21), BlockId(22)]
    assert private_pages(blocks, second) == blocks
    assert private_pages([BlockId(10), BlockId(11), BlockId(12)], first) == []
    cache.release(first)
    assert cache.evict(5) == [12]  # 10 and 11 are still held by the second
    cache.release(second)
    cache.check_invariants()


def test_unload_drops_the_adapters_entries() -> None:
    cache = PrefixCache(PAGE)
    kept = cache_pages(cache, B, TOKENS, first_page=30)
    cache.release(kept)
    running = cache_pages(cache, A, TOKENS, first_page=10)
    reader = cache.match(A, TOKENS)[:1]
    cache.hold(reader)
    cache.release(running[1:])  # pages 11, 12: unheld now
    running = running[:1]
    assert sorted(cache.drop_adapter(A)) == [11, 12]
    assert cache.match(A, TOKENS) == []
    # Still held: page 10 leaves with its last holder, not before.
    assert cache.owns(BlockId(10))
    assert cache.release(running) == []
    assert cache.release(reader) == [10]
    assert pages(cache.match(B, TOKENS)) == [30, 31, 32]
    cache.check_invariants()


def test_pages_cached_after_an_unload_are_never_indexed() -> None:
    """A sequence still running on an unloaded version keeps caching for itself only."""
    cache = PrefixCache(PAGE)
    path = cache_pages(cache, A, TOKENS[:4], first_page=10)
    assert cache.drop_adapter(A) == []
    assert cache.insert(path, A, TOKENS[4:8], BlockId(11))
    fresh: list[CachedPage] = []
    assert cache.insert(fresh, A, TOKENS[:4], BlockId(20))  # at the root too
    assert cache.match(A, TOKENS) == []
    assert cache.num_evictable == 0
    assert sorted(cache.release(path) + cache.release(fresh)) == [10, 11, 20]
    cache.check_invariants()
    assert cache.num_pages == 0


def test_flush_drops_every_unheld_page() -> None:
    cache = PrefixCache(PAGE)
    cache.release(cache_pages(cache, A, TOKENS, first_page=10))
    held = cache_pages(cache, B, TOKENS, first_page=20)
    assert sorted(cache.flush()) == [10, 11, 12]
    assert cache.num_pages == 3
    assert pages(cache.match(B, TOKENS)) == [20, 21, 22]
    cache.release(held)
    assert sorted(cache.flush()) == [20, 21, 22]
    cache.check_invariants()


def test_reclaim_gives_back_a_page_and_its_subtree() -> None:
    """An adapter row wants a given page: it leaves with the pages cached below it."""
    cache = PrefixCache(PAGE)
    cache.release(cache_pages(cache, A, TOKENS, first_page=10))
    branch = (*TOKENS[:8], 7, 7, 7, 7)
    other = cache.match(A, branch)
    cache.hold(other)
    assert cache.insert(other, A, branch[8:12], BlockId(20))
    cache.release(other)
    assert sorted(cache.reclaim(BlockId(11))) == [11, 12, 20]
    assert pages(cache.match(A, TOKENS)) == [10]
    cache.check_invariants()
    held = cache.match(A, TOKENS)
    cache.hold(held)
    with pytest.raises(AssertionError, match="held"):
        cache.reclaim(BlockId(10))


def test_release_without_hold_is_a_bug() -> None:
    cache = PrefixCache(PAGE)
    path = cache_pages(cache, A, TOKENS[:4], first_page=10)
    cache.release(path)
    with pytest.raises(AssertionError, match="released more often than held"):
        cache.release(path)


def test_a_page_cannot_be_cached_twice() -> None:
    cache = PrefixCache(PAGE)
    cache_pages(cache, A, TOKENS[:4], first_page=10)
    with pytest.raises(AssertionError, match="already cached"):
        cache.insert([], B, TOKENS[:4], BlockId(10))
