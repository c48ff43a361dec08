"""The prefix cache over the arena's KV pages: the calls the planner and the scheduler make over
a sequence's life. Pure: no asyncio, no torch; the planner owns the only instance.

A sequence's pages:
- `admit`: the longest cached prefix of its tokens under its adapter version is held and starts
  its block table; its computed count starts after it (the last token is always computed, so
  the first sampled token has logits). Only the rest is prefilled.
- `settle`: once a step's tokens are applied (its StepDone, one step late under the overlap
  schedule), each full page its rows wrote joins the cache, if its sequence still runs in the
  same admission. Never earlier: a page's key needs all its tokens on the host (a decode row's
  input is the token the step before sampled, which the host learns one step late), and one
  rule is simpler than two: an indexed page was written by a step whose StepDone the host has
  seen. A page is never written again once full (a sequence writes only past its computed
  count), and steps run in order, so every later step reads it whole.
- `release` (finish, abort, preemption): its held pages go back to the cache, evictable once
  nobody holds them; its private pages are freed.

Memory: evictable pages count as allocatable. KV demand evicts them least recently released
first (`evict`), before idle adapters' rows are reclaimed or anything is preempted; adapter
demand takes rows whose KV pages are all evictable (`reclaim_rows`) before evicting idle
adapters. So cached pages are free memory that happens to hold something useful.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

from lorasrv.engine.arena import Arena
from lorasrv.engine.prefix_cache import Namespace, PrefixCache, private_pages
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId, BlockId, SeqId

_FirstPage = tuple[Namespace, tuple[int, ...]]  # version, a prompt's first page of tokens

#: A waiting request waits for a prefilling one's pages when their prompts share at least this
#: many tokens (in whole pages) that the cache does not hold yet.
MIN_SHARED_TOKENS: Final = 32
#: Prefilling requests a waiting one is compared with, at most (the same first page and version).
MAX_CANDIDATES: Final = 8


class Written(NamedTuple):
    """What one row of a sent step writes: `seq`'s KV through token `num_computed`, in its
    admission number `admission` (a preemption and re-admission starts another)."""

    seq: Sequence
    num_computed: int
    admission: int


def written_by(seqs: Iterable[Sequence]) -> tuple[Written, ...]:
    """The rows of a step just committed (call after the plan moved their computed counts)."""
    return tuple(Written(seq, seq.num_computed, seq.num_admissions) for seq in seqs)


def namespace_of(seq: Sequence) -> Namespace:
    """Whose KV a sequence computes: its adapter version (a fresh id at every load), or None
    for the base model. (Tests swap this for mutants that forget the adapter or its version.)"""
    return seq.adapter_id


class PrefixPages:
    def __init__(self, arena: Arena, page_size: int, *, enabled: bool) -> None:
        self.arena = arena
        self.page_size = page_size
        self.enabled = enabled
        self.cache = PrefixCache(page_size, on_evictable=arena.mark_evictable)
        self.num_evicted = 0  # unused cached pages given back to KV or adapter demand
        # Sequences prefilling a prompt with full pages still to compute, by version and first
        # page: a waiting prompt that shares pages with one of them (a system prompt, SGLang's
        # `n` samples) waits for those pages instead of computing the same ones beside it.
        # NOTE: keyed by one page of tokens, since every waiting request is checked every plan.
        self._prefilling: dict[_FirstPage, list[Sequence]] = {}
        self._prefilling_keys: dict[SeqId, _FirstPage] = {}
        self.min_shared_pages = max(1, -(-MIN_SHARED_TOKENS // page_size))

    @property
    def num_pages(self) -> int:
        """Pages the cache owns (held by running sequences or not)."""
        return self.cache.num_pages

    # ------------------------------------------------------------------ one sequence

    def waits_for_shared_prefix(self, seq: Sequence) -> bool:
        """Another sequence under the same version is prefilling a prompt that shares at least
        `min_shared_pages` full pages with `seq`'s (or all of a shorter prompt's), some of them
        not cached yet: `seq` waits
        for them (they join the cache as that sequence's steps settle) and then prefills only
        the rest, so a batch computes a shared system prompt once."""
        if not self._prefilling or len(seq.prompt_ids) <= self.page_size:
            return False
        candidates = self._prefilling.get(self._first_page(seq), ())
        enough = max(1, min(self.min_shared_pages, self._num_prompt_pages(seq)))
        for other in candidates[:MAX_CANDIDATES]:
            if other is not seq:
                shared = self._shared_pages(seq, other)
                if shared >= enough and shared > len(other.prefix):
                    return True
        return False

    def admit(self, seq: Sequence) -> None:
        """Put `seq`'s cached prefix in place (held) before its other pages are reserved."""
        assert not seq.blocks, f"{seq.request_id} admitted twice"
        assert not seq.num_computed, f"{seq.request_id} admitted with computed tokens"
        if not self.enabled:
            return
        hit = self.cache.match(namespace_of(seq), seq.token_slice(0, seq.num_tokens))
        self.cache.hold(hit)
        seq.prefix = hit
        seq.blocks = [node.page for node in hit]
        seq.num_computed = len(hit) * self.page_size

    def admitted(self, seq: Sequence) -> None:
        """`seq` runs from this plan on (its pages are reserved)."""
        seq.num_admissions += 1
        if seq.cached_tokens is None:  # reported for the first admission only
            seq.cached_tokens = seq.num_computed
        if self.enabled and len(seq.prefix) < self._num_prompt_pages(seq):
            key = self._first_page(seq)
            self._prefilling.setdefault(key, []).append(seq)
            self._prefilling_keys[seq.seq_id] = key

    def settle(self, written: Iterable[Written]) -> None:
        """A step's tokens are applied: cache the full pages its rows wrote (rows of sequences
        that ended or were preempted since are skipped; their pages are gone or private)."""
        if not self.enabled:
            return
        for seq, num_computed, admission in written:
            if seq.status is SeqStatus.RUNNING and seq.num_admissions == admission:
                self._offer(seq, num_computed)

    def _offer(self, seq: Sequence, num_written: int) -> None:
        """Cache `seq`'s full pages among its first `num_written` tokens (settled KV) whose
        tokens the host has."""
        size = self.page_size
        known = min(num_written, len(seq.prompt_ids) + len(seq.output_ids))
        namespace = namespace_of(seq)
        for index in range(len(seq.prefix), known // size):
            tokens = seq.token_slice(index * size, (index + 1) * size)
            self.cache.insert(seq.prefix, namespace, tokens, seq.blocks[index])
        if len(seq.prefix) >= self._num_prompt_pages(seq):
            self._forget_prefill(seq)

    def release(self, seq: Sequence) -> None:
        """`seq` stops running (finish, abort, preemption, failed admission): its cached pages
        go back to the cache, its private pages are freed."""
        private = private_pages(seq.blocks, seq.prefix)
        self.arena.free(private + self.cache.release(seq.prefix))
        seq.blocks = []
        seq.prefix = []
        seq.num_computed = 0
        self._forget_prefill(seq)

    # ------------------------------------------------------------------ memory

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` evictable pages, least recently released first."""
        freed = self.cache.evict(num_pages)
        self.arena.free(freed)
        self.num_evicted += len(freed)
        return len(freed)

    def reclaim_rows(self, num_rows: int) -> None:
        """Make up to `num_rows` reclaimable rows free: the cache gives back every evictable
        page under them (with its cached subtree, which nothing holds either)."""
        arena = self.arena
        for row in arena.take_reclaimable_rows(num_rows):
            for page in map(BlockId, arena.geometry.row_pages(row)):
                if arena.is_evictable(page):
                    freed = self.cache.reclaim(page)
                    arena.free(freed)
                    self.num_evicted += len(freed)

    def drop_adapter(self, adapter_id: AdapterId) -> int:
        """An adapter version is gone for good: its entries leave the index, its unheld pages
        are freed (held ones when their last holder releases them)."""
        freed = self.cache.drop_adapter(adapter_id)
        self.arena.free(freed)
        return len(freed)

    def flush(self) -> int:
        """Free every evictable page (SGLang's /flush_cache); held ones stay."""
        freed = self.cache.flush()
        self.arena.free(freed)
        return len(freed)

    # ------------------------------------------------------------------ internals

    def _num_prompt_pages(self, seq: Sequence) -> int:
        """Full pages of its prompt a later prompt could match (an identical one recomputes
        its last token, so a prompt of whole pages offers one page fewer)."""
        return (len(seq.prompt_ids) - 1) // self.page_size

    def _shared_pages(self, a: Sequence, b: Sequence) -> int:
        """Full prompt pages (of those each could match) both prompts begin with."""
        size, limit = self.page_size, min(self._num_prompt_pages(a), self._num_prompt_pages(b))
        pa, pb = a.prompt_ids, b.prompt_ids
        if pa[: limit * size] == pb[: limit * size]:
            return limit
        shared = 0
        while pa[shared * size : (shared + 1) * size] == pb[shared * size : (shared + 1) * size]:
            shared += 1
        return shared

    def _forget_prefill(self, seq: Sequence) -> None:
        key = self._prefilling_keys.pop(seq.seq_id, None)
        if key is not None:
            group = self._prefilling[key]
            group.remove(seq)
            if not group:
                del self._prefilling[key]

    def _first_page(self, seq: Sequence) -> _FirstPage:
        return namespace_of(seq), seq.prompt_ids[: self.page_size]

    def check_invariants(self, running: Iterable[Sequence]) -> None:
        """Every KV page has one owner: a running sequence (private) or the cache."""
        self.cache.check_invariants()
        running = list(running)
        private = sum(len(private_pages(s.blocks, s.prefix)) for s in running)
        assert private + self.cache.num_pages == self.arena.num_used_pages, "a KV page leaked"
        assert self.cache.num_evictable == self.arena.num_evictable_pages, "evictable pages"
        running_ids = {s.seq_id for s in running}
        prefilling = [s for group in self._prefilling.values() for s in group]
        assert all(s.seq_id in running_ids for s in prefilling), "prefill of nobody"
        assert len(self._prefilling_keys) == len(prefilling), "prefill keys"
