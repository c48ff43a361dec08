"""Prefix cache: full KV pages shared read-only between sequences, keyed by adapter version and
the whole token prefix up to and including the page. Pure: no asyncio, no torch; the scheduler's
planner owns the only instance. It hands out page ids it holds; it never allocates any.

A trie per namespace (an adapter id, which a reload changes, or None for the base model): a node
is one cached page, found by its parent and its own `page_size` tokens, so a node stands for the
exact token prefix on the path to it (no hashes, no collisions). A sequence holds the nodes of
its first full pages (a *path*: holding a node means holding its ancestors), each counted once
in `refs`. Unheld nodes are evictable, least recently released first; a node is released no
earlier than its descendants, so the oldest unheld node is always a leaf and eviction never
orphans a subtree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lorasrv.ids import AdapterId, BlockId

#: Whose KV a page holds: the adapter version (a fresh id at every load), or None for the base.
Namespace = AdapterId | None


@dataclass(slots=True, eq=False)
class CachedPage:
    """One cached full page: its KV is that of `namespace` over the tokens on its trie path."""

    page: BlockId
    tokens: tuple[int, ...]  # this page's own tokens: its key among its siblings
    parent: CachedPage | None
    namespace: Namespace
    children: dict[tuple[int, ...], CachedPage] = field(default_factory=dict)
    refs: int = 0  # sequences holding it (each holds its whole path once)
    # False once unloaded (or cached under such a node): never matched again, freed at its
    # last release instead of waiting for eviction.
    is_indexed: bool = True


class PrefixCache:
    """The index of cached pages, their holders' counts and the eviction order."""

    def __init__(
        self, page_size: int, on_evictable: Callable[[BlockId, bool], None] | None = None
    ) -> None:
        assert page_size > 0
        self.page_size = page_size
        # Told when a page that stays cached becomes evictable (True) or held again (False);
        # pages that leave the cache are returned to the caller instead.
        self._on_evictable = on_evictable
        self._roots: dict[Namespace, dict[tuple[int, ...], CachedPage]] = {}
        self._by_page: dict[BlockId, CachedPage] = {}
        # Unheld indexed nodes, least recently released first (values unused).
        self._evictable: OrderedDict[CachedPage, None] = OrderedDict()
        # Unloaded adapter versions: a sequence still running on one caches for itself only.
        self._dropped: set[AdapterId] = set()

    # ------------------------------------------------------------------ queries

    @property
    def num_pages(self) -> int:
        """Pages the cache owns: held, evictable, or unloaded but still held."""
        return len(self._by_page)

    @property
    def num_evictable(self) -> int:
        """Pages `evict` could give back now (no sequence holds them)."""
        return len(self._evictable)

    def owns(self, page: BlockId) -> bool:
        return page in self._by_page

    def is_evictable(self, page: BlockId) -> bool:
        node = self._by_page.get(page)
        return node is not None and node in self._evictable

    def match(self, namespace: Namespace, tokens: Sequence[int]) -> list[CachedPage]:
        """The cached pages of the longest full-page prefix of `tokens` under `namespace`,
        leaving at least the last token uncached (the first sampled token needs its logits).
        A lookup only: `hold` the result before relying on it."""
        size = self.page_size
        max_pages = (len(tokens) - 1) // size
        found: list[CachedPage] = []
        children = self._roots.get(namespace)
        while children is not None and len(found) < max_pages:
            start = len(found) * size
            node = children.get(tuple(tokens[start : start + size]))
            if node is None:
                break
            found.append(node)
            children = node.children
        return found

    # ------------------------------------------------------------------ holding

    def hold(self, path: Sequence[CachedPage]) -> None:
        """A sequence starts using `path` (a `match` result): none of it can be evicted now."""
        for node in path:
            node.refs += 1
            if node.refs == 1 and node in self._evictable:
                del self._evictable[node]
                self._tell(node.page, False)

    def release(self, path: Sequence[CachedPage]) -> list[BlockId]:
        """A sequence stops using `path` (finish, abort, preemption). Returns the pages that
        left the cache with it (unloaded ones whose last holder this was): free them."""
        freed: list[BlockId] = []
        # Deepest first, so that among pages released together the deepest is evicted first.
        for node in reversed(path):
            assert node.refs > 0, f"page {node.page} released more often than held"
            node.refs -= 1
            if node.refs:
                continue
            if node.is_indexed:
                self._evictable[node] = None
                self._tell(node.page, True)
            else:
                freed.append(self._forget(node))
        return freed

    def insert(
        self, path: list[CachedPage], namespace: Namespace, tokens: Sequence[int], page: BlockId
    ) -> bool:
        """Offer a sequence's newly full page: its KV is computed (or committed to a step that
        runs before any step that could read it), `tokens` are its `page_size` tokens and `path`
        holds the sequence's pages before it. The node the sequence now holds is appended to
        `path`. True: `page` now belongs to the cache. False: the same prefix was cached already
        (another sequence computed it too); the sequence holds that node and keeps `page` as its
        own, to free as usual."""
        assert len(tokens) == self.page_size, f"page of {len(tokens)} tokens"
        assert page not in self._by_page, f"page {page} is already cached"
        parent = path[-1] if path else None
        assert parent is None or parent.namespace == namespace, "path of another namespace"
        key = tuple(tokens)
        siblings = self._siblings(parent, namespace)
        existing = siblings.get(key) if siblings is not None else None
        if existing is not None:
            self.hold([existing])
            path.append(existing)
            return False
        node = CachedPage(page=page, tokens=key, parent=parent, namespace=namespace, refs=1)
        if siblings is None:
            node.is_indexed = False  # its prefix was unloaded: cached for its holder alone
        else:
            siblings[key] = node
        self._by_page[page] = node
        path.append(node)
        return True

    # ------------------------------------------------------------------ dropping

    def evict(self, num_pages: int) -> list[BlockId]:
        """Give back up to `num_pages` unheld pages, least recently released first."""
        freed: list[BlockId] = []
        while self._evictable and len(freed) < num_pages:
            node, _ = self._evictable.popitem(last=False)
            # NOTE: release order makes the oldest unheld node a leaf; dropping an inner node
            # would strand its subtree's pages outside every free list.
            assert not node.children, f"evicting page {node.page}, which has cached children"
            self._unlink(node)
            freed.append(self._forget(node))
        return freed

    def reclaim(self, page: BlockId) -> list[BlockId]:
        """Give back this unheld page (an adapter row wants it) with its unheld subtree."""
        node = self._by_page[page]
        assert node in self._evictable, f"page {page} is held"
        self._unlink(node)
        freed: list[BlockId] = []
        for each in _subtree(node):
            self._evictable.pop(each)  # unheld parent: every descendant is unheld too
            freed.append(self._forget(each))
        return freed

    def drop_adapter(self, adapter_id: AdapterId) -> list[BlockId]:
        """An adapter version is unloaded: nothing of it is matched or indexed again. Returns
        its unheld pages; held ones are freed when their last holder releases them."""
        self._dropped.add(adapter_id)
        children = self._roots.pop(adapter_id, None)
        freed: list[BlockId] = []
        for top in (children or {}).values():
            for node in list(_subtree(top)):
                node.is_indexed = False
                node.children = {}  # nothing is looked up below an unindexed node
                if not node.refs:
                    self._evictable.pop(node)
                    freed.append(self._forget(node))
        return freed

    def flush(self) -> list[BlockId]:
        """Drop every unheld page (SGLang's /flush_cache); held ones stay cached."""
        return self.evict(len(self._evictable))

    # ------------------------------------------------------------------ internals

    def _siblings(
        self, parent: CachedPage | None, namespace: Namespace
    ) -> dict[tuple[int, ...], CachedPage] | None:
        """Where a child of `parent` is indexed; None when that prefix is no longer indexed."""
        if parent is None:
            if namespace is not None and namespace in self._dropped:
                return None
            return self._roots.setdefault(namespace, {})
        return parent.children if parent.is_indexed else None

    def _tell(self, page: BlockId, evictable: bool) -> None:
        if self._on_evictable is not None:
            self._on_evictable(page, evictable)

    def _unlink(self, node: CachedPage) -> None:
        siblings = self._roots[node.namespace] if node.parent is None else node.parent.children
        del siblings[node.tokens]
        if node.parent is None and not siblings:
            del self._roots[node.namespace]

    def _forget(self, node: CachedPage) -> BlockId:
        del self._by_page[node.page]
        return node.page

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Recount the trie; raise AssertionError on any inconsistency."""
        seen: set[BlockId] = set()
        for namespace, children in self._roots.items():
            assert children, f"empty root for {namespace}"
            for top in children.values():
                assert top.parent is None
                for node in _subtree(top):
                    self._check_node(node, namespace)
                    seen.add(node.page)
        for page, node in self._by_page.items():
            assert node.page == page
            if page not in seen:  # unloaded: only its holders keep it
                assert not node.is_indexed, f"page {page} is indexed but unreachable"
                assert node.refs > 0, f"unloaded page {page} has no holder: it leaked"
        assert all(n.is_indexed and not n.refs for n in self._evictable), "evictable set"
        unheld = sum(1 for p in seen if not self._by_page[p].refs)
        assert unheld == len(self._evictable), "an unheld page is not evictable"

    def _check_node(self, node: CachedPage, namespace: Namespace) -> None:
        assert node.is_indexed
        assert node.namespace == namespace
        assert self._by_page.get(node.page) is node, f"page {node.page} indexed twice"
        assert node.refs >= 0
        for key, child in node.children.items():
            assert child.tokens == key
            assert child.parent is node
            # NOTE: holders hold whole paths, so a child never has more holders than its parent.
            assert child.refs <= node.refs, f"page {child.page} held without its parent"


def _subtree(top: CachedPage) -> Iterable[CachedPage]:
    """`top` and every node below it, parents before children."""
    stack = [top]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def private_pages(blocks: Sequence[BlockId], path: Sequence[CachedPage]) -> list[BlockId]:
    """The pages of a sequence's block table that the cache does not own: free them at its end."""
    return [page for i, page in enumerate(blocks) if i >= len(path) or path[i].page != page]
